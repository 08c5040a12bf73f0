"""End to end: real Trainer runs through the CLI entry points, logging, determinism."""

import json
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
    default = parse_recipe([])
    recipe = parse_recipe([str(REPO / "recipes" / "quickstart.yaml")])
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
