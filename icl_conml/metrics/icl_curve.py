"""``evaluate`` metric: the in-context learning curve of a model's predictions.

Load it by path (works offline): ``icl_conml.metrics.load("icl_curve")`` or
``evaluate.load(icl_conml.metrics.path("icl_curve"))``. Each example is one prompt: its
``predictions`` and ``references`` are the n predictions and labels at every query position.
It returns the error at each k (``curve``), the error at k = d and 2d and the needed context
length: the numbers of ``icl_conml.evaluation`` (it calls the same functions).
"""

import datasets
import evaluate

from icl_conml.evaluation.statistics import prediction_curve
from icl_conml.tasks import get_task

_DESCRIPTION = """Error at k (the normalised squared error of the prediction for the (k+1)-th query
after k in-context examples, averaged over prompts) and needed context length (smallest k with
error <= threshold), for a function class of icl_conml."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one list of n predictions per prompt (position k predicts from the k pairs before it).
    references: the n labels of each prompt.
    task: function class name (default linear_regression); n_dims: its input dimension (required:
        it sets the error normaliser); task_kwargs: e.g. {"sparsity": 3}; threshold: default 0.1.
Returns:
    curve (list over k), error_at_d, error_at_2d (when inside the prompt), needed_context_length
    (-1 when no k reaches the threshold).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class IclCurve(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Garg et al. 2022, What Can Transformers Learn In-Context?",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("float32")),
                }
            ),
        )

    def _compute(
        self, predictions, references, task="linear_regression", n_dims=None, task_kwargs=None, threshold=0.1
    ):
        if n_dims is None:
            raise ValueError("icl_curve needs n_dims (the input dimension sets the error normaliser)")
        function_class = get_task(
            task, int(n_dims), allow_import=True, **(task_kwargs or {})
        )  # the caller's own argument
        curve, summary = prediction_curve(function_class, predictions, references, threshold)
        return {"curve": curve, **summary}
