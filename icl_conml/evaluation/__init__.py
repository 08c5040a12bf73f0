"""Few-shot evaluation: how many in-context examples does a model need?

``python -m icl_conml.evaluation --model PATH_OR_HUB_ID --output_dir OUT [...]`` measures
the error at k (the normalised squared error of the prediction for the (k+1)-th query after
k examples, ``task.error``) for k = 0 … n_points − 1, for the model and the reference
estimators of ``baselines.py``, on the same prompts; writes ``results.json`` (curves,
bootstrap 95% intervals, needed context lengths, metadata), ``results.md`` and ``curves.png``.

``python -m icl_conml.evaluation compare --models A1 [A2 …] --against B1 [B2 …] --output_dir
OUT`` gives the paper's Table 5 (Rel. Min. Error, Shot Spare), models paired by seed.

The modules, in the order data flows through them:

- ``arguments``: what is asked (``EvaluationArguments``, ``CompareArguments``, the CLI's
  model and output arguments) and ``EvaluationError``, the one-line user error;
- fresh prompts and Garg et al.'s distribution shifts come from ``data`` (``sample_prompts``,
  ``parse_ood``, ``Prompts``; a bad shift is its one-line ``PromptError``);
- ``loading``: a model (folder or Hub id) and a fixed eval set;
- ``setting``: the task, prompts and reference estimators one evaluation runs;
- ``predictions``: the model's and the estimators' predictions, and their errors;
- ``statistics``: bootstrap, needed context length, Table 5 metrics, the curve summary
  (and the Trainer's ``compute_metrics``);
- ``curves``: the evaluation of one model (``evaluate_model``, the results.json dict);
- ``compare``: Table 5 of models A against B (``compare_models``);
- ``report``: Markdown tables, plots, JSON files;
- ``cli``: the two command lines (``__main__`` runs it).
"""

from ..data import OODShift, PromptError, Prompts, parse_ood, sample_prompts
from .arguments import (
    OOD_KINDS,
    CommonArguments,
    CompareArguments,
    ComparedModels,
    EvaluatedModel,
    EvaluationArguments,
    EvaluationError,
    OutputArguments,
)
from .cli import build_compare_parser, build_parser, main
from .compare import compare_errors, compare_models
from .curves import NUMERICAL_ZERO, evaluate_model, summarise
from .loading import load_eval_set, load_model
from .predictions import baseline_predictions, errors_of, model_predictions, progress_bar
from .report import comparison_table, plot_curves, results_table, write_comparison, write_results
from .setting import Setting, resolve_baselines, resolve_setting
from .statistics import (
    bootstrap_means,
    curve_metrics,
    curve_summary,
    curve_with_interval,
    needed_context_length,
    prediction_curve,
    table5_metrics,
)

__all__ = [
    "NUMERICAL_ZERO",
    "OOD_KINDS",
    "CommonArguments",
    "CompareArguments",
    "ComparedModels",
    "EvaluatedModel",
    "EvaluationArguments",
    "EvaluationError",
    "OODShift",
    "OutputArguments",
    "PromptError",
    "Prompts",
    "Setting",
    "baseline_predictions",
    "bootstrap_means",
    "build_compare_parser",
    "build_parser",
    "compare_errors",
    "compare_models",
    "comparison_table",
    "curve_metrics",
    "curve_summary",
    "curve_with_interval",
    "errors_of",
    "evaluate_model",
    "load_eval_set",
    "load_model",
    "main",
    "model_predictions",
    "needed_context_length",
    "parse_ood",
    "plot_curves",
    "prediction_curve",
    "progress_bar",
    "resolve_baselines",
    "resolve_setting",
    "results_table",
    "sample_prompts",
    "summarise",
    "table5_metrics",
    "write_comparison",
    "write_results",
]
