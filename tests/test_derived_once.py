"""What a recipe implies is derived once: a plain run builds its function class once, and the
evaluation of a saved model uses the model's own function class (no second one).

Measured in a fresh process with a subclass of ``LinearRegression`` that counts its constructions,
named in the recipe by import path like any user's class.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

COUNTED_TASK = textwrap.dedent(
    '''
    """LinearRegression that records each construction (n_dims) in BUILT."""
    from dataclasses import dataclass

    from icl_conml.tasks import LinearRegression

    BUILT: list[int] = []


    @dataclass
    class CountedLinearRegression(LinearRegression):
        def __post_init__(self) -> None:
            BUILT.append(self.n_dims)
            super().__post_init__()
    '''
)

SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import counted_task
    from icl_conml.evaluation import EvaluationArguments, evaluate_model
    from icl_conml.train import main

    out = sys.argv[1]
    code = main([
        "--task", "counted_task:CountedLinearRegression", "--n_dims", "3", "--n_points", "6",
        "--n_embd", "16", "--n_layer", "1", "--n_head", "2", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--eval_strategy", "steps", "--eval_steps", "2",
        "--eval_n_prompts", "8", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
        "--output_dir", out,
    ])
    training = list(counted_task.BUILT)
    counted_task.BUILT.clear()
    evaluate_model(out, EvaluationArguments(n_prompts=8, bootstrap_samples=10, baselines=["averaging"]))
    print(json.dumps({"code": code, "training": training, "evaluation": counted_task.BUILT}))
    """
)


def test_a_plain_run_builds_its_function_class_once_and_evaluation_uses_the_models(tmp_path):
    (tmp_path / "counted_task.py").write_text(COUNTED_TASK)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["code"] == 0
    assert counts["training"] == [3], counts  # parse → validate → model, sampler, eval, metrics, save
    assert counts["evaluation"] == [3], counts  # the loaded model's own; the evaluation builds none
