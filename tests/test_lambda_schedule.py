"""λ schedule: ConML off for the first conml_lambda_start steps, then a linear warm-up."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_TRAIN_ARGS

from icl_conml.arguments import ConMLArguments, RecipeError
from icl_conml.recipe_parser import parse_recipe
from icl_conml.train import main


def test_lambda_at_follows_start_and_warmup():
    settings = ConMLArguments(conml_lambda=0.4, conml_lambda_start=10, conml_lambda_warmup=4)
    steps = (0, 9, 10, 11, 12, 13, 50)
    expected = [0, 0, 0.1, 0.2, 0.3, 0.4, 0.4]
    assert [settings.lambda_at(step) for step in steps] == pytest.approx(expected)
    assert ConMLArguments(conml_lambda=0.4).lambda_at(0) == 0.4  # the default: λ from step 0


def _log(folder) -> list[dict]:
    return json.loads((folder / "trainer_state.json").read_text())["log_history"]


def test_before_the_start_a_conml_run_is_a_plain_run_then_conml_logs_its_lambda(tmp_path):
    args = [*TINY_TRAIN_ARGS, "--max_steps", "6", "--seed", "3"]
    assert main([*args, "--conml_lambda", "0", "--output_dir", str(tmp_path / "plain")]) == 0
    late = [*args, "--conml_lambda", "0.5", "--conml_lambda_start", "3", "--conml_lambda_warmup", "2"]
    assert main([*late, "--output_dir", str(tmp_path / "late")]) == 0
    plain, delayed = _log(tmp_path / "plain"), _log(tmp_path / "late")
    # The same prompts and weights: identical losses until ConML starts at step 3 (0-based).
    assert [e["loss"] for e in delayed[:3]] == [e["loss"] for e in plain[:3]]
    assert "d_in" not in delayed[2] and delayed[3]["conml_lambda"] == pytest.approx(0.25)
    assert delayed[4]["conml_lambda"] == pytest.approx(0.5) and delayed[5]["loss"] != plain[5]["loss"]


def test_a_negative_start_is_one_line():
    with pytest.raises(RecipeError, match="conml_lambda_start=-1 must be >= 0"):
        parse_recipe(["--conml_lambda_start", "-1"])
