"""Bad input gets one clear line: the key, the value and what is allowed; exit status 2; no
traceback; and nothing is built (every check runs before the model exists)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import icl_conml.train as train_module
from icl_conml.recipe_parser import parse_recipe
from icl_conml.train import main

REPO = Path(__file__).resolve().parents[1]

# (id, YAML recipe text or None, command-line arguments, fragments the one error line must hold).
# "{tmp}" in an argument is replaced by the test's temporary folder.
CASES = [
    ("n_dims<1", None, ["--n_dims", "0"], ["n_dims=0 must be >= 1"]),
    ("n_points<1", None, ["--n_points", "0"], ["n_points=0 must be >= 1"]),
    (
        "sparsity>n_dims",
        None,
        ["--task", "sparse_linear_regression", "--n_dims", "5", "--sparsity", "9"],
        ["sparsity=9 must be between 1 and n_dims=5"],
    ),
    (
        "n_points>n_positions",
        None,
        ["--n_points", "11", "--n_positions", "5"],
        ["n_points=11 is beyond the model's n_positions=5", "raise n_positions or lower n_points"],
    ),
    ("negative-lambda", None, ["--conml_lambda", "-0.5"], ["conml_lambda=-0.5 must be >= 0"]),
    (
        "unknown-task",
        None,
        ["--task", "linear_regresion"],
        ["task='linear_regresion' is not allowed", "did you mean 'linear_regression'?", "decision_tree"],
    ),
    (
        "unknown-view",
        None,
        ["--conml_views", "prefix"],
        ["conml_views='prefix' is not allowed", "did you mean 'prefix_half'?", "random_subset"],
    ),
    (
        "unknown-distance",
        None,
        ["--conml_distance", "cosin"],
        ["conml_distance='cosin' is not allowed", "did you mean 'cosine'?", "sigmoid_sq"],
    ),
    (
        "unknown-representation",
        None,
        ["--conml_representation", "hidden"],
        ["conml_representation='hidden' is not allowed", "probe_output, probe_hidden"],
    ),
    ("K<1", None, ["--conml_num_views", "0"], ["conml_num_views (K)=0 must be >= 1"]),
    (
        "unknown-activation",
        None,
        ["--activation_function", "gelu_tanh"],
        ["activation_function='gelu_tanh' is not allowed", "gelu_pytorch_tanh"],
    ),
    (
        "view-larger-than-context",
        None,
        ["--conml_views", "random_subset", "--conml_subset_max", "1.5"],
        ["conml_subset_max <= 1", "(got 0.5, 1.5)", "fractions of the context"],
    ),
    (
        "view-needs-two-points",
        None,
        ["--n_points", "1"],
        ["ConML needs prompts of at least 2 points", "has 1", "set conml_lambda=0"],
    ),
    (
        "conml-needs-two-tasks",
        None,
        ["--per_device_train_batch_size", "1"],
        ["ConML needs at least 2 tasks per batch", "raise per_device_train_batch_size"],
    ),
    (
        "curriculum-end-below-start",
        None,
        ["--n_points", "11", "--curriculum_points_start", "20"],
        ["curriculum end below start: n_points=11 < curriculum_points_start=20"],
    ),
    (
        "n_head-divides-n_embd",
        None,
        ["--n_embd", "30", "--n_head", "4"],
        ["n_embd=30 is not divisible by n_head=4"],
    ),
    (
        "unknown-flag",
        None,
        ["--lerning_rate", "0.1"],
        ["unknown option --lerning_rate", "did you mean 'learning_rate'?"],
    ),
    ("stray-argument", None, ["--n_dims", "5", "extra"], ["unexpected argument(s) ['extra']", "--key value"]),
    ("not-an-int", None, ["--n_dims", "five"], ["n_dims='five' is not an integer"]),
    ("missing-value", None, ["--n_dims"], ["--n_dims needs a value"]),
    (
        "not-a-bool",
        None,
        ["--overwrite_output_dir", "maybe"],
        ["overwrite_output_dir='maybe' is not a boolean"],
    ),
    (
        "scheduler-typo",
        None,
        ["--lr_scheduler_type", "cosin"],
        ["lr_scheduler_type='cosin' is not allowed", "did you mean 'cosine'?"],
    ),
    (
        "eval-strategy-typo",
        None,
        ["--eval_strategy", "step"],
        ["eval_strategy='step' is not allowed", "did you mean 'steps'?"],
    ),
    (
        "eval-without-eval-set",
        None,
        ["--eval_strategy", "steps", "--eval_n_prompts", "0"],
        ["eval_strategy='steps' needs an eval set but eval_n_prompts=0"],
    ),
    (
        "report-to-typo",
        None,
        ["--report_to", "tensorbord"],
        ["report_to='tensorbord' is not allowed", "did you mean 'tensorboard'?"],
    ),
    (
        "report-to-not-installed",
        None,
        ["--report_to", "wandb"],
        ["report_to='wandb' needs the wandb package", "pip install 'icl_conml[wandb]' or set report_to=none"],
    ),
    ("max_steps<1", None, ["--max_steps", "0"], ["max_steps=0 must be >= 1"]),
    ("negative-lr", None, ["--learning_rate", "-1"], ["learning_rate=-1.0 must be >= 0"]),
    ("save_steps<=0", None, ["--save_steps", "-1"], ["save_steps=-1.0 must be > 0"]),
    (
        "negative-noise",
        None,
        ["--task", "noisy_linear_regression", "--noise_std", "-1"],
        ["noise_std=-1.0 must be >= 0"],
    ),
    (
        "flat-key-of-another-task",
        None,
        ["--depth", "3"],
        ["depth=3 is not a hyper-parameter of task linear_regression"],
    ),
    ("yaml-unknown-key", "n_dim: 5\n", [], ["unknown recipe key 'n_dim'", "did you mean 'n_dims'?"]),
    ("yaml-wrong-type", "n_dims: five\n", [], ["n_dims='five' has type str; expected int"]),
    ("yaml-float-for-int", "n_points: 10.5\n", [], ["n_points=10.5 has type float; expected int"]),
    (
        "yaml-list-for-float",
        "conml_lambda: [0.1]\n",
        [],
        ["conml_lambda=[0.1] has type list; expected float"],
    ),
    ("yaml-invalid", "n_dims: [5\n", [], ["is not valid YAML"]),
    ("yaml-not-a-mapping", "- n_dims\n- 5\n", [], ["must be a mapping of key: value, got list"]),
    ("yaml-bad-value", "task: linear\nn_dims: 5\n", [], ["task='linear' is not allowed"]),
    (
        "missing-recipe-file",
        None,
        ["{tmp}/nope.yaml"],
        ["recipe file", "nope.yaml' not found", "pass the path of a YAML recipe"],
    ),
    (
        "resume-missing-path",
        None,
        ["--resume_from_checkpoint", "{tmp}/run/checkpoint-9"],
        ["resume_from_checkpoint=", "checkpoint-9' is not a directory", "or 'latest'"],
    ),
    (
        "resume-latest-without-checkpoint",
        None,
        ["--resume_from_checkpoint", "latest"],
        ["resume_from_checkpoint='latest' but output_dir=", "holds no complete checkpoint"],
    ),
    (
        "output-dir-under-a-file",
        None,
        ["--output_dir", "{tmp}/recipe.yaml/out"],
        ["output_dir=", "cannot be created", "pick a writable folder"],
    ),
]


NEEDS = {"report-to-not-installed": importlib.util.find_spec("wandb") is None}
PARAMS = [
    pytest.param(
        *case[1:],
        id=case[0],
        marks=pytest.mark.skipif(not NEEDS.get(case[0], True), reason="wandb is installed"),
    )
    for case in CASES
]


def _argv(tmp_path: Path, yaml_text: str | None, args: list[str]) -> list[str]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml_text if yaml_text is not None else "max_steps: 1\n")
    argv = [str(recipe)] if yaml_text is not None else []
    argv += [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    if "--output_dir" not in argv:
        argv += ["--output_dir", str(tmp_path / "run")]
    return argv


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model gets built: every check must come first."""

    def build_model(recipe):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr(train_module, "build_model", build_model)


@pytest.mark.parametrize(("yaml_text", "args", "fragments"), PARAMS)
def test_bad_input_is_one_clear_line(yaml_text, args, fragments, tmp_path, capsys, no_model):
    code = main(_argv(tmp_path, yaml_text, args))
    captured = capsys.readouterr()
    assert code == 2, captured.err[-2000:]
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("icl_conml: error: ")]
    assert len(errors) == 1, captured.err[-2000:]
    for fragment in fragments:
        assert fragment.replace("{tmp}", str(tmp_path)) in errors[0], errors[0]
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_yaml_float_written_without_a_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; a float key accepts it as the number it means.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 1e-3\nconml_lambda: 2e-2\nresume_from_checkpoint: false\n")
    parsed = parse_recipe([str(recipe), "--output_dir", str(tmp_path)])
    assert parsed.training.learning_rate == 0.001 and parsed.conml.conml_lambda == 0.02
    assert parsed.training.resume_from_checkpoint is None


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "icl_conml.train", *args], cwd=REPO, env=env, capture_output=True, text=True
    )


def test_real_cli_prints_one_line_and_exits_2(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("task: linear_regression\nconml_veiws: shuffle\n")
    done = _cli(str(recipe), "--output_dir", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"icl_conml: error: unknown recipe key 'conml_veiws' in {recipe}; did you mean 'conml_views'?"
    )
    assert not (tmp_path / "run").exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    done = _cli("--conml_distance", "l3", "--output_dir", str(tmp_path / "run"), "--debug")
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "conml_distance='l3' is not allowed" in done.stderr


# ---- the evaluation CLI (python -m icl_conml.evaluation) ------------------------------------------------
EVAL_CASES = [
    (
        "missing-model-path",
        ["--model", "{tmp}/nope"],
        ["cannot load model '{tmp}/nope' (local path or Hub id)", "pass a training output_dir"],
    ),
    (
        "hub-id-offline-not-cached",
        ["--model", "icl-conml-tests/no-such-model"],
        [
            "cannot load model 'icl-conml-tests/no-such-model' (local path or Hub id)",
            "in the Hugging Face cache",
        ],
    ),
    (
        "eval-set-of-another-task",
        ["--model", "{tmp}/model", "--eval_set", "{tmp}/sets/tree"],
        ["holds decision_tree prompts of dimension 5, but the evaluation is linear_regression with n_dims=5"],
    ),
    (
        "eval-set-of-another-dimension",
        ["--model", "{tmp}/model", "--eval_set", "{tmp}/sets/d3"],
        [
            "holds linear_regression prompts of dimension 3, but the evaluation is linear_regression with n_dims=5"
        ],
    ),
    (
        "eval-set-longer-than-the-model",
        ["--model", "{tmp}/model", "--eval_set", "{tmp}/sets/long"],
        ["has 20 points per prompt, more than the model's n_positions=11"],
    ),
    (
        "eval-set-missing",
        ["--model", "{tmp}/model", "--eval_set", "{tmp}/sets/none"],
        ["cannot load eval set '{tmp}/sets/none'", "icl_conml make-eval-sets"],
    ),
    (
        "eval-n_dims-too-large",
        ["--model", "{tmp}/model", "--n_dims", "9"],
        ["--n_dims 9 is larger than the model's input dimension 5"],
    ),
    (
        "eval-n_points-beyond-positions",
        ["--model", "{tmp}/model", "--n_points", "50"],
        ["--n_points 50 is beyond the model's n_positions=11"],
    ),
    ("eval-unknown-task", ["--model", "{tmp}/model", "--task", "nope"], ["unknown --task 'nope'"]),
    ("eval-unknown-ood", ["--model", "{tmp}/model", "--ood", "sideways"], ["unknown --ood 'sideways'"]),
    ("eval-task-kwargs-not-json", ["--model", "{tmp}/model", "--task_kwargs", "{bad"], ["is not JSON"]),
    (
        "compare-unpaired",
        ["compare", "--models", "{tmp}/model", "{tmp}/model", "--against", "{tmp}/model"],
        ["compare pairs models by seed: got 2 model(s) A and 1 model(s) B"],
    ),
]


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory, load_script) -> Path:
    """A saved tiny model (linear regression, d=5, 11 positions) and eval sets that do not fit it."""
    from icl_conml import ICLConfig, ICLModel

    root = tmp_path_factory.mktemp("eval_inputs")
    config = ICLConfig(n_dims=5, n_positions=11, n_embd=16, n_layer=1, n_head=2, task="linear_regression")
    ICLModel(config).save_pretrained(root / "model")
    make_eval_sets = load_script("data_scripts/make_eval_sets.py")
    for name, (task, n_dims, n_points) in {
        "tree": ("decision_tree", 5, 11),
        "d3": ("linear_regression", 3, 11),
        "long": ("linear_regression", 5, 20),
    }.items():
        make_eval_sets.build_eval_set(task, n_dims, n_points, 4, seed=0).save_to_disk(
            str(root / "sets" / name)
        )
    return root


@pytest.mark.parametrize(("args", "fragments"), [pytest.param(*c[1:], id=c[0]) for c in EVAL_CASES])
def test_bad_evaluation_input_is_one_clear_line(args, fragments, eval_inputs, capsys):
    from icl_conml.evaluation import main as evaluation_main

    tmp = str(eval_inputs)
    argv = [arg.replace("{tmp}", tmp) for arg in args] + ["--output_dir", f"{tmp}/out", "--n_prompts", "4"]
    code = evaluation_main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err[-2000:]
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("icl_conml: error: ")]
    assert len(errors) == 1, captured.err[-2000:]  # (a weight-loading progress bar may come before it)
    for fragment in fragments:
        assert fragment.replace("{tmp}", tmp) in errors[0], errors[0]


def test_evaluation_cli_usage_errors_are_one_line(capsys):
    from icl_conml.evaluation import main as evaluation_main

    with pytest.raises(SystemExit) as exited:
        evaluation_main(["--output_dir", "x"])  # --model missing
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0]
