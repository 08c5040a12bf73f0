"""``torch_compile: true`` trains like eager PyTorch, with and without ConML.

The curriculum tests compile with the ``aot_eager`` backend (dynamo tracing and AOT autograd, the
parts that see our masks, appended tokens and changing shapes; no code generation). A growing
curriculum changes the prompt length: dynamo recompiles once with dynamic shapes, not on every
size; evaluation runs the uncompiled model (the Trainer's choice). The slow test uses the
default inductor backend (a C compiler builds the kernels): about 1.5 minutes for 3 steps on
a busy 2-core machine with an empty inductor cache, 13 s with a warm one.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TRAIN_ARGS

from icl_conml.recipe_parser import parse_recipe
from icl_conml.train import run


def _train(output_dir, *extra: str) -> list[tuple[int, str, float]]:
    """(step, key, value) for every logged loss and eval_loss of a run."""
    run(parse_recipe([*TINY_TRAIN_ARGS, "--output_dir", str(output_dir), "--warmup_steps", "0", *extra]))
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [
        (entry["step"], key, entry[key])
        for entry in history
        for key in ("loss", "conml_loss", "eval_loss")
        if key in entry
    ]


def _assert_same(compiled: list, eager: list) -> None:
    assert [row[:2] for row in compiled] == [row[:2] for row in eager]
    for (step, key, got), (_, _, want) in zip(compiled, eager, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (step, key)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


@pytest.mark.parametrize("conml_lambda", [pytest.param("0", marks=pytest.mark.slow), "0.02"])
def test_compiled_training_under_a_curriculum_matches_eager_and_recompiles_once(
    conml_lambda, tmp_path, fresh_dynamo
):
    # Prompts of 5, 5, 7, 7 points, then the eval set's 11 (and eval mode).
    args = ["--max_steps", "4", "--curriculum_points_start", "5", "--curriculum_points_interval", "2",
            "--conml_lambda", conml_lambda, "--eval_n_prompts", "16", "--eval_strategy", "steps",
            "--eval_steps", "4"]  # fmt: skip
    eager = _train(tmp_path / "eager", *args)
    compiled = _train(
        tmp_path / "compiled", *args, "--torch_compile", "true", "--torch_compile_backend", "aot_eager"
    )
    _assert_same(compiled, eager)
    assert any(key == "conml_loss" for _, key, _ in compiled) == (conml_lambda != "0")
    # One graph for 5 points, one with dynamic shapes for the rest (the Trainer evaluates uncompiled).
    assert fresh_dynamo["stats"]["unique_graphs"] == 2, dict(fresh_dynamo["stats"])


@pytest.mark.slow
def test_inductor_compiled_conml_run_matches_eager(tmp_path, fresh_dynamo):
    args = ["--max_steps", "3", "--conml_lambda", "0.02"]
    eager = _train(tmp_path / "eager", *args)
    compiled = _train(tmp_path / "compiled", *args, "--torch_compile", "true")
    _assert_same(compiled, eager)
    losses = [value for _, key, value in compiled if key == "loss"]
    assert losses[-1] < losses[0]  # it trains
