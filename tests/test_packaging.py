"""Packaging: the wheel ships the recipes, the core install needs no extra, recipes resolve by name."""

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from icl_conml import resources
from icl_conml.arguments import RecipeError
from icl_conml.recipe_parser import parse_recipe

REPO = Path(__file__).resolve().parents[1]
EXTRA_MODULES = ["deepspeed", "peft", "tensorboard", "wandb", "sklearn", "matplotlib", "evaluate"]
TINY = ["--n_embd", "16", "--n_layer", "1", "--n_head", "2", "--n_dims", "3", "--n_points", "6"]
TINY += ["--per_device_train_batch_size", "8", "--report_to", "none", "--disable_tqdm", "true"]


def _shipped_files() -> list[str]:
    root = REPO / "recipes"
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix in resources.SUFFIXES
    )


def test_wheel_ships_every_recipe_and_only_core_dependencies(tmp_path):
    source = tmp_path / "src"  # build from a copy: no build/ or egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("icl_conml", "recipes"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(source),
        "--no-deps",
        "-q",
        "-w",
        str(tmp_path / "dist"),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("icl_conml-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        scripts = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    shipped = {
        name.removeprefix("icl_conml/recipes/") for name in names if name.startswith("icl_conml/recipes/")
    }
    assert set(_shipped_files()) <= shipped, set(_shipped_files()) - shipped
    assert {
        "quickstart.yaml",
        "linear_regression.yaml",
        "accelerate/zero2.yaml",
        "accelerate/ds_zero2.json",
    } <= shipped
    modules = {str(p.relative_to(REPO)) for p in (REPO / "icl_conml").rglob("*.py")}
    assert modules <= names, modules - names  # a subpackage missing from pyproject's packages list
    # One console script with subcommands; the two older names stay as aliases.
    assert "icl_conml = icl_conml.cli:main" in scripts and "icl-conml-train = icl_conml.train:main" in scripts
    core = [
        line.split(" ", 1)[1]
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    core_names = {requirement.split(">")[0].split("<")[0].split("=")[0].strip() for requirement in core}
    assert not core_names & {
        "deepspeed",
        "peft",
        "matplotlib",
        "evaluate",
        "scikit-learn",
        "tensorboard",
        "wandb",
    }
    torch = next(requirement for requirement in core if requirement.startswith("torch"))
    assert "<" not in torch  # no upper pin on torch
    for extra in ("deepspeed", "peft", "tensorboard", "wandb", "trees", "plots", "evaluate", "test", "dev"):
        assert f'extra == "{extra}"' in metadata


def test_recipes_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    by_path = parse_recipe([str(REPO / "recipes/linear_regression.yaml")])
    monkeypatch.chdir(tmp_path)  # no recipes/ here: names and repo-relative paths still resolve
    for name in ("linear_regression", "linear_regression.yaml", "recipes/linear_regression.yaml"):
        recipe = parse_recipe([name])
        assert recipe.to_dict() == by_path.to_dict(), name
    assert parse_recipe(["quickstart", "--conml_lambda", "0"]).conml.conml_lambda == 0
    assert resources.resolve("zero2") == resources.recipes_dir() / "accelerate/zero2.yaml"
    assert resources.resolve("accelerate/ds_zero3.json").name == "ds_zero3.json"
    assert {"linear_regression", "quickstart", "accelerate/zero2", "accelerate/ds_zero2.json"} <= set(
        resources.available()
    )
    with pytest.raises(RecipeError, match="not found"):
        parse_recipe(["linear_regresion"])
    # copy: the accelerate configs name their DeepSpeed file relative to the working directory.
    target = resources.copy(tmp_path)
    assert (target / "accelerate/ds_zero2.json").is_file() and sorted(
        str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()
    ) == _shipped_files()


CORE_ONLY = """
import json, subprocess, sys
for name in {blocked}:
    sys.modules[name] = None  # as if not installed: import fails, importlib.util.find_spec gives None
from icl_conml.train import main
from icl_conml import evaluation, metrics
from icl_conml.extras import MissingExtra
tiny = {tiny}
out = {{}}
out["train"] = main([*tiny, "--max_steps", "3", "--output_dir", "run", "--eval_strategy", "steps",
                     "--eval_steps", "3", "--eval_n_prompts", "16"])
out["lora"] = main([*tiny, "--max_steps", "1", "--output_dir", "lora", "--lora_r", "2",
                    "--backbone_name_or_path", "run"])
out["tensorboard"] = main([*tiny, "--max_steps", "1", "--output_dir", "tb", "--report_to", "tensorboard"])
out["evaluation"] = evaluation.main(["--model", "run", "--output_dir", "eval", "--n_prompts", "16",
                                     "--bootstrap_samples", "10", "--quiet"])
try:
    metrics.load("icl_curve")
except MissingExtra as error:
    out["metrics"] = str(error)
out["imported"] = sorted(name for name in {blocked} if sys.modules.get(name) is not None)
print("RESULT " + json.dumps(out))
"""


def test_core_install_trains_and_evaluates_and_names_missing_extras(tmp_path):
    """Every extra made unimportable: training and evaluation run, features needing one say which."""
    script = CORE_ONLY.format(blocked=EXTRA_MODULES, tiny=TINY)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["train"] == 0 and result["evaluation"] == 0
    assert result["lora"] == 2 and result["tensorboard"] == 2
    assert "pip install 'icl_conml[peft]'" in done.stderr
    assert "report_to='tensorboard' needs the tensorboard package" in done.stderr
    assert "pip install 'icl_conml[tensorboard]'" in done.stderr
    assert "curves.png not written" in done.stderr and "pip install 'icl_conml[plots]'" in done.stderr
    assert "pip install 'icl_conml[evaluate]'" in result["metrics"]
    assert result["imported"] == []
    assert (tmp_path / "eval/results.json").is_file() and not (tmp_path / "eval/curves.png").exists()
    assert (tmp_path / "run/model.safetensors").is_file()
