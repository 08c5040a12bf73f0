"""A function class written outside the package trains, evaluates and reloads, registered both ways
(``@register_task`` and an import path in the recipe), as docs/extending.md shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from icl_conml.arguments import RecipeError
from icl_conml.recipe_parser import parse_recipe
from icl_conml.tasks import TASKS

USER_MODULE = textwrap.dedent(
    '''
    """A user's function class: y = scale · sign(w·x)."""
    from dataclasses import dataclass

    import torch

    from icl_conml.tasks import FunctionClass, Params, register_task


    @register_task("scaled_sign")
    @dataclass
    class ScaledSign(FunctionClass):
        scale: float = 2.0

        def validate(self) -> None:
            if self.scale <= 0:
                raise ValueError(f"scale={self.scale} must be > 0")

        def sample_params(self, n_tasks, generator, active_dims=None) -> Params:
            return {"w": torch.randn(n_tasks, self.n_dims, generator=generator)}

        def evaluate(self, params, xs, generator=None):
            return self.scale * torch.sign(torch.einsum("bnd,bd->bn", xs, params["w"].to(xs.dtype)))

        @property
        def error_normaliser(self) -> float:
            return self.scale**2
    '''
)
TINY = ["--n_embd", "16", "--n_layer", "1", "--n_head", "2", "--n_dims", "3", "--n_points", "6"]
TINY += ["--max_steps", "4", "--per_device_train_batch_size", "8", "--logging_steps", "2"]
TINY += ["--eval_strategy", "steps", "--eval_steps", "4", "--eval_n_prompts", "16", "--save_steps", "100"]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "my_icl_tasks.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("my_icl_tasks", None)
    TASKS.remove("scaled_sign")


def _env(folder: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(folder), "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}


def _python(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=_env(folder), capture_output=True, text=True, timeout=300
    )


def test_an_import_path_trains_evaluates_and_reloads_in_fresh_processes(user_module, tmp_path):
    out = tmp_path / "run"
    kwargs = json.dumps({"scale": 3.0})
    trained = _python(
        user_module, "-m", "icl_conml.train", *TINY, "--task", "my_icl_tasks:ScaledSign",
        "--task_kwargs", kwargs, "--output_dir", str(out),
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "my_icl_tasks:ScaledSign" and config["task_kwargs"] == {"scale": 3.0}
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("eval_error_at_k/0" in entry for entry in state["log_history"])  # compute_metrics ran

    evaluate = ["-m", "icl_conml.evaluation", "--model", str(out), "--output_dir", str(tmp_path / "ev")]
    evaluate += ["--n_prompts", "32", "--bootstrap_samples", "10", "--quiet"]
    refused = _python(user_module, *evaluate)  # the config's import path is code from a file
    assert refused.returncode == 2 and "--trust_remote_code" in refused.stderr, refused.stderr[-2000:]
    evaluated = _python(user_module, *evaluate, "--trust_remote_code")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["metadata"]["task"] == "my_icl_tasks:ScaledSign"

    reloaded = _python(
        user_module, "-c",
        "import sys; from transformers import AutoModel; import icl_conml; "
        f"m = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True); "
        "print(type(m.task_class).__name__, m.task_class.scale)",
    )  # fmt: skip
    assert reloaded.returncode == 0, reloaded.stderr[-2000:]
    assert reloaded.stdout.split()[-2:] == ["ScaledSign", "3.0"]


def test_a_registered_class_trains_by_name_and_its_model_reloads_with_trust_remote_code(
    user_module, tmp_path
):
    import my_icl_tasks  # noqa: F401  (registers "scaled_sign")

    from icl_conml.train import main

    out = tmp_path / "run"
    assert main([*TINY, "--task", "scaled_sign", "--output_dir", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    # Recorded by import path, so another process (that never imported it) can rebuild the class,
    # with trust_remote_code (it imports code named by a file), or after importing it itself.
    assert config["task"] == "my_icl_tasks:ScaledSign" and config["task_kwargs"] == {"scale": 2.0}
    load = f"from transformers import AutoModel; import icl_conml; AutoModel.from_pretrained({str(out)!r}"
    refused = _python(user_module, "-c", load + ")")
    assert refused.returncode == 1 and "RemoteCodeError" in refused.stderr, refused.stderr[-2000:]
    for code in (load + ", trust_remote_code=True)", "import my_icl_tasks; " + load + ")"):
        reloaded = _python(user_module, "-c", code)
        assert reloaded.returncode == 0, reloaded.stderr[-2000:]


def test_the_class_validates_its_own_hyperparameters(user_module):
    with pytest.raises(RecipeError, match="scale=-1.0 must be > 0"):
        parse_recipe(["--task", "my_icl_tasks:ScaledSign", "--task_kwargs", '{"scale": -1.0}'])
    with pytest.raises(RecipeError, match="takes scale"):
        parse_recipe(["--task", "my_icl_tasks:ScaledSign", "--task_kwargs", '{"depth": 2}'])
    with pytest.raises(RecipeError, match="cannot import"):
        parse_recipe(["--task", "no_such_module:Task"])


def test_built_in_flat_keys_and_task_kwargs_agree():
    recipe = parse_recipe(["--task", "sparse_linear_regression", "--task_kwargs", '{"sparsity": 2}'])
    assert recipe.task.hyperparameters() == {"sparsity": 2}
    assert parse_recipe(["--task", "sparse_linear_regression"]).task.hyperparameters() == {"sparsity": 3}
    with pytest.raises(RecipeError, match="given twice"):
        parse_recipe(
            ["--task", "sparse_linear_regression", "--sparsity", "3", "--task_kwargs", '{"sparsity": 2}']
        )


def test_a_registered_view_distance_and_baseline_train_and_evaluate(tmp_path):
    """The docs/extending.md examples: a view, a distance and a baseline registered by a user."""
    import torch

    from icl_conml import conml
    from icl_conml.baselines import BASELINES, parse_baseline, register_baseline
    from icl_conml.evaluation import baseline_predictions
    from icl_conml.train import main

    @conml.register_view("every_other")
    def every_other(n_tasks, n_points, num_views, generator, subset_min=0.5, subset_max=0.5):
        index = torch.arange(0, n_points, 2)
        return index.expand(n_tasks, num_views, -1).contiguous()

    @conml.register_distance("abs")
    def absolute(a, b):
        return (a - b).abs().mean(-1)

    @register_baseline("zero")
    def zero(xs, ys, queries=None):
        return torch.zeros_like(ys)

    try:
        out = tmp_path / "run"
        args = [*TINY, "--conml_lambda", "0.1", "--conml_views", "every_other", "--conml_distance", "abs"]
        assert main([*args, "--output_dir", str(out)]) == 0
        state = json.loads((out / "trainer_state.json").read_text())
        logged = [entry for entry in state["log_history"] if "d_in" in entry]
        assert logged and all(entry["d_in"] >= 0 for entry in logged)
        xs, ys = torch.randn(4, 6, 3), torch.randn(4, 6)
        assert baseline_predictions(parse_baseline("zero"), _prompts(xs, ys)).abs().sum() == 0
    finally:
        conml.VIEWS.remove("every_other")
        conml.DISTANCES.remove("abs")
        BASELINES.remove("zero")


def _prompts(xs, ys):
    from icl_conml.evaluation import Prompts

    return Prompts(xs, ys)


USER_EXTENSIONS = textwrap.dedent(
    '''
    """A user's view, distance, representation and baseline, named by import path (not registered)."""
    import torch


    def every_other(n_tasks, n_points, num_views, generator, subset_min=0.5, subset_max=0.5):
        index = torch.arange(0, n_points, 2)
        return index.expand(n_tasks, num_views, -1).contiguous()


    def absolute(a, b):
        return (a - b).abs().mean(-1)


    def mean_hidden(appended_outputs, appended_hidden):
        return appended_hidden.mean(-1, keepdim=True)


    def constant(xs, ys, queries=None, level=0.0):
        return torch.full_like(ys, level)


    not_a_view = 3
    '''
)


def test_a_view_distance_representation_and_baseline_by_import_path_in_fresh_processes(tmp_path):
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "my_extensions.py").write_text(USER_EXTENSIONS)
    out = tmp_path / "run"
    conml_args = ["--conml_lambda", "0.1", "--conml_views", "my_extensions:every_other"]
    conml_args += [
        "--conml_distance",
        "my_extensions:absolute",
        "--conml_representation",
        "my_extensions:mean_hidden",
    ]
    trained = _python(folder, "-m", "icl_conml.train", *TINY, *conml_args, "--output_dir", str(out))
    assert trained.returncode == 0, trained.stderr[-2000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert [entry for entry in state["log_history"] if "d_in" in entry]

    evaluated = _python(
        folder, "-m", "icl_conml.evaluation", "--model", str(out), "--output_dir", str(tmp_path / "ev"),
        "--n_prompts", "16", "--bootstrap_samples", "10", "--quiet",
        "--baselines", "my_extensions:constant:level=2.0", "averaging",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert "my_extensions:constant:level=2.0" in json.dumps(results)

    wrong = _python(folder, "-m", "icl_conml.train", *TINY, "--conml_views", "my_extensions:not_a_view")
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        "icl_conml: error: conml_views='my_extensions:not_a_view': conml_views 'my_extensions:not_a_view': "
        "my_extensions.not_a_view is not a view sampler "
        "f(n_tasks, n_points, num_views, generator, subset_min, subset_max)"
    ]


def test_a_registry_refuses_a_taken_name_and_objects_of_another_kind():
    from icl_conml import conml
    from icl_conml.baselines import register_baseline

    with pytest.raises(
        ValueError, match="conml_views name 'shuffle' is already registered for icl_conml.conml:shuffle"
    ):
        conml.register_view("shuffle")(lambda n_tasks, n_points, num_views, generator, lo, hi: None)
    conml.register_view("shuffle")(conml.shuffle)  # the same object again: a no-op
    with pytest.raises(ValueError, match="is not a distance f"):
        conml.register_distance("nothing")(lambda a: a)
    with pytest.raises(ValueError, match="is not a FunctionClass subclass"):
        TASKS.add("not_a_task", dict)
    with pytest.raises(ValueError, match="42 is not an estimator"):
        register_baseline("bad")(42)
    assert "nothing" not in conml.DISTANCES and "not_a_task" not in TASKS and "bad" not in TASKS
