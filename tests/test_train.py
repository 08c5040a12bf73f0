"""End to end: real Trainer runs through the CLI entry points, logging, determinism."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_TRAIN_ARGS

from icl_conml.arguments import known_keys
from icl_conml.recipe_parser import parse_recipe
from icl_conml.train import main

REPO = Path(__file__).resolve().parents[1]
CONML_KEYS = {"icl_loss", "conml_loss", "d_in", "d_out"}


def train(tmp_path: Path, *extra: str, name: str = "run") -> list[dict]:
    out = tmp_path / name
    assert main([*TINY_TRAIN_ARGS, "--output_dir", str(out), *extra]) == 0
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def train_logs(history: list[dict]) -> list[dict]:
    return [entry for entry in history if "icl_loss" in entry]


def test_conml_run_lowers_the_loss_and_logs_every_component(tmp_path):
    # d = 2 and a pool of 4 functions: learnable in 60 steps, so the test is quick and cannot pass by noise
    history = train_logs(
        train(
            tmp_path,
            "--max_steps",
            "60",
            "--conml_lambda",
            "0.5",
            "--n_dims",
            "2",
            "--task_pool_size",
            "4",
            "--learning_rate",
            "0.003",
        )  # fmt: skip
    )
    assert len(history) == 60
    for entry in history:
        assert CONML_KEYS <= set(entry)
        assert entry["loss"] == pytest.approx(entry["icl_loss"] + 0.5 * entry["conml_loss"], abs=1e-4)
    first = sum(e["icl_loss"] for e in history[:10]) / 10
    last = sum(e["icl_loss"] for e in history[-10:]) / 10
    assert last < 0.7 * first


def test_plain_icl_logs_only_the_icl_loss(tmp_path):
    history = train_logs(train(tmp_path, "--max_steps", "3", "--conml_lambda", "0"))
    assert history and all(not (CONML_KEYS - {"icl_loss"}) & set(entry) for entry in history)
    assert all(entry["loss"] == pytest.approx(entry["icl_loss"], abs=1e-5) for entry in history)


def test_same_seed_same_numbers(tmp_path):
    args = ("--max_steps", "8", "--conml_views", "shuffled_subset", "--conml_num_views", "2")
    a = train_logs(train(tmp_path, *args, name="a"))
    b = train_logs(train(tmp_path, *args, name="b"))
    c = train_logs(train(tmp_path, *args, "--seed", "1", name="c"))
    keys = ("loss", "icl_loss", "conml_loss", "grad_norm")
    assert [[e[k] for k in keys] for e in a] == [[e[k] for k in keys] for e in b]
    assert [e["loss"] for e in a] != [e["loss"] for e in c]


def test_gradient_accumulation_sees_the_same_data(tmp_path):
    whole = train_logs(train(tmp_path, "--max_steps", "2", "--conml_lambda", "0", name="whole"))
    split = train_logs(
        train(
            tmp_path,
            "--max_steps",
            "2",
            "--conml_lambda",
            "0",
            "--per_device_train_batch_size",
            "8",
            "--gradient_accumulation_steps",
            "2",
            name="split",
        )  # fmt: skip
    )
    assert split[0]["loss"] == pytest.approx(whole[0]["loss"], rel=1e-5)


def test_eval_loss_is_reported(tmp_path):
    history = train(
        tmp_path,
        "--max_steps",
        "4",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--eval_n_prompts",
        "32",
    )
    assert any("eval_loss" in entry for entry in history)


def test_every_option_of_the_conml_objective_runs(tmp_path):
    options = [
        ("--conml_representation", "probe_hidden", "--conml_num_probes", "2"),
        ("--conml_views", "random_subset", "--conml_subset_min", "0.3", "--conml_subset_max", "0.7"),
        ("--conml_views", "shuffle", "--conml_distance", "cosine"),
        ("--conml_loss", "infonce", "--conml_temperature", "0.5", "--conml_distance", "sq_euclidean"),
        ("--conml_terms", "out", "--conml_prefix_mode", "extra_sequence"),
    ]
    for i, option in enumerate(options):
        history = train_logs(train(tmp_path, "--max_steps", "2", *option, name=f"opt{i}"))
        assert history and CONML_KEYS <= set(history[-1])


def test_quickstart_recipe_is_the_built_in_default():
    """No recipe runs the packaged quickstart file (its keys, not the dataclass defaults of keys a
    recipe omits): the same resolved recipe, and the same keys recorded as given."""
    default = parse_recipe([])
    recipe = parse_recipe([str(REPO / "recipes" / "quickstart.yaml")])
    assert default.to_dict() == recipe.to_dict() and default.raw == recipe.raw
    assert parse_recipe(["--max_steps", "7"]).training.max_steps == 7
    for section in ("model", "task", "conml"):
        assert getattr(recipe, section) == getattr(default, section)
    for key in yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text()):
        if hasattr(default.training, key):
            assert getattr(recipe.training, key) == getattr(default.training, key), key


def test_recipe_values_are_overridden_by_flags():
    recipe = parse_recipe(
        [str(REPO / "recipes" / "linear_regression.yaml"), "--n_layer", "2", "--max_steps", "7"]
    )
    assert recipe.model.n_layer == 2 and recipe.training.max_steps == 7
    assert recipe.model.n_embd == 256 and recipe.task.curriculum_points_start == 11
    assert recipe.conml.conml_lambda == 0.02 and recipe.conml.conml_views == "prefix_half"


def cli_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def test_help_documents_every_key():
    done = subprocess.run(
        [sys.executable, "-m", "icl_conml.train", "--help"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    assert done.returncode == 0
    for key in ("task", "n_dims", "n_points", "n_embd", "n_layer", "n_head", "conml_lambda", "conml_views"):
        assert f"--{key}" in done.stdout
    missing = [key for key in known_keys() if f"--{key}" not in done.stdout]
    assert not missing
    # Without a recipe the defaults shown are the quickstart's values, where they differ from a
    # dataclass default too (the quickstart's fused activation; gelu_new for a recipe that omits it).
    words = " ".join(done.stdout.split())
    assert "the quickstart uses it), gelu, relu. (default: gelu_pytorch_tanh)" in words


@pytest.mark.parametrize("launcher", ["python", "accelerate"])
def test_cli_runs_a_recipe(tmp_path, launcher):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        yaml.safe_dump({"n_embd": 32, "n_layer": 2, "n_head": 2, "max_steps": 3, "logging_steps": 1})
    )
    prefix = [sys.executable, "-m"]
    if launcher == "accelerate":
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "-m"]
    command = [
        *prefix,
        "icl_conml.train",
        str(recipe),
        "--output_dir",
        str(tmp_path / "out"),
        "--eval_n_prompts",
        "0",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "out" / "recipe.yaml").exists()


# ---- what a run tells its user: console lines, the end-of-run summary, the training-curve plot ---------
def test_a_run_ends_with_its_errors_next_to_least_squares_its_folder_and_the_next_commands(tmp_path, capsys):
    from icl_conml.evaluation import EvaluationArguments, evaluate_model

    out = tmp_path / "run"
    assert main([*TINY_TRAIN_ARGS, "--output_dir", str(out), "--max_steps", "3"]) == 0
    printed = capsys.readouterr().out
    # Every log line names its step; none shows an epoch (prompts are generated, there are no epochs).
    logs = [line for line in printed.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in logs] == ["step 1/3", "step 2/3", "step 3/3", "step 3/3 done"]
    assert "icl_error" in logs[0] and "epoch" not in printed
    # The summary: the saved model and least squares on 256 fixed prompts, at k = d and 2d.
    summary = printed[printed.index("finished 3 steps") :].splitlines()
    assert summary[0].endswith(f"the model is in {out}")
    expected = evaluate_model(
        str(out), EvaluationArguments(n_prompts=256, seed=0, baselines=["least_squares"], bootstrap_samples=1)
    )["curves"]
    for line, k in zip(summary[3:5], (5, 10), strict=True):
        label, model, reference = line.rsplit(maxsplit=2)[0], line.split()[-3], line.split()[-1]
        assert label.strip().startswith(f"k = {'2d' if k == 10 else 'd'} = {k}")
        assert float(model) == pytest.approx(expected["model"][k], abs=5e-4)
        assert reference == "0.001" and line.split()[-2] == "<"  # noiseless least squares: exact from k = d
    assert f"  icl_conml eval --model {out} --output_dir {out / 'eval'}" in summary
    assert f"  icl_conml push {out} --hub_model_id YOUR_USER/NAME" in summary
    assert summary[-1] == f"training curves: {out / 'training_curves.png'}"
    assert (out / "training_curves.png").stat().st_size > 0
    # icl_error is the training loss on the evaluation's scale (squared error / d for linear regression).
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    for entry in train_logs(history):
        assert entry["icl_error"] == pytest.approx(entry["icl_loss"] / 5, abs=1e-6)


def test_a_refused_run_leaves_no_folder_and_logs_no_recipe(tmp_path, capsys, caplog):
    out = tmp_path / "new" / "run"
    with caplog.at_level(logging.INFO, logger="icl_conml"):
        code = main([*TINY_TRAIN_ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("icl_conml: error: resume_from_checkpoint='latest' but output_dir=")
    assert not (tmp_path / "new").exists()  # made by this run, removed with its .lock
    assert not [record for record in caplog.records if "resolved recipe" in record.getMessage()]
