"""Files from others are data: a task named by import path in a model folder's config.json, an
eval set's metadata or an experiment record is imported only with ``trust_remote_code`` (issue 22,
item 1). Each case runs in a fresh process whose working directory is the attacker folder's
parent, so the attacker's module *is* importable: only the check stops it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PAYLOAD = textwrap.dedent(
    '''
    """Code shipped next to a model: it leaves a marker when imported."""
    import pathlib
    from dataclasses import dataclass

    from icl_conml.tasks import LinearRegression

    pathlib.Path({marker!r}).write_text("imported")


    @dataclass
    class X(LinearRegression):
        pass
    '''
)
TASK = "evm.payload:X"


@pytest.fixture
def attacker(tmp_path) -> Path:
    """``tmp_path/evm``: a real (tiny) ICLModel folder whose config.json names ``evm.payload:X``,
    with ``evm/payload.py`` beside it. Returns the marker path (not yet written)."""
    from icl_conml.modeling import ICLConfig, ICLModel

    folder = tmp_path / "evm"
    model = ICLModel(ICLConfig(n_dims=3, n_positions=6, n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "task": TASK}))
    marker = tmp_path / "marker"
    (folder / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    return marker


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_model_folder_runs_no_code_without_trust_remote_code(attacker):
    parent = attacker.parent
    evaluated = _run(parent, "-m", "icl_conml.evaluation", "--model", "evm", "--output_dir", "out", "--quiet")
    assert evaluated.returncode == 2, evaluated.stderr[-2000:]
    lines = evaluated.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icl_conml: error: model 'evm'"), evaluated.stderr
    assert "evm.payload:X" in lines[0] and "--trust_remote_code" in lines[0]
    assert not attacker.exists()

    script = textwrap.dedent(
        """
        import icl_conml
        from transformers import AutoModel
        from icl_conml import ICLModel
        from icl_conml.registry import RemoteCodeError
        for load in (AutoModel.from_pretrained, ICLModel.from_pretrained):
            try:
                load("evm")
            except RemoteCodeError as error:
                print("refused:", error)
        """
    )
    loaded = _run(parent, "-c", script)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.count("refused: task 'evm.payload:X'") == 2, loaded.stdout
    assert "trust_remote_code=True" in loaded.stdout
    assert not attacker.exists()


def test_trust_remote_code_imports_the_task(attacker):
    parent = attacker.parent
    loaded = _run(
        parent, "-c",
        "import icl_conml; from transformers import AutoModel; "
        "print(type(AutoModel.from_pretrained('evm', trust_remote_code=True).task_class).__name__)",
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split()[-1] == "X" and attacker.exists()
    attacker.unlink()
    evaluated = _run(
        parent, "-m", "icl_conml.evaluation", "--model", "evm", "--output_dir", "out", "--trust_remote_code",
        "--n_prompts", "16", "--bootstrap_samples", "10", "--baselines", "--quiet",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads((parent / "out" / "results.json").read_text())["metadata"]["task"] == TASK
    assert attacker.exists()


def test_an_eval_set_runs_no_code_without_trust_remote_code(attacker):
    parent = attacker.parent
    made = _run(
        parent, "-m", "icl_conml.eval_sets", "--tasks", TASK, "--n_dims", "3", "--n_points", "5",
        "--n_prompts", "8", "--output_dir", "sets",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]  # make-eval-sets takes the user's import path
    (folder,) = (parent / "sets").iterdir()
    assert folder.name == "evm.payload-X_d3_n5_s0"
    attacker.unlink()

    script = textwrap.dedent(
        f"""
        from icl_conml.evaluation import EvaluationError, load_eval_set
        try:
            load_eval_set({str(folder)!r})
        except EvaluationError as error:
            print("refused:", error)
        """
    )
    refused = _run(parent, "-c", script)
    assert refused.returncode == 0, refused.stderr[-2000:]
    assert "refused: eval set" in refused.stdout and "trust_remote_code=True" in refused.stdout
    assert not attacker.exists()
    trusted = _run(
        parent, "-c",
        f"from icl_conml.evaluation import load_eval_set; print(load_eval_set({str(folder)!r}, trust_remote_code=True)[1]['task'])",
    )  # fmt: skip
    assert trusted.returncode == 0 and trusted.stdout.split()[-1] == TASK, trusted.stderr[-2000:]
    assert attacker.exists()


def test_an_experiment_record_runs_no_code(attacker):
    script = textwrap.dedent(
        f"""
        from types import SimpleNamespace
        from icl_conml.experiment.analysis import check_pairing
        recipe = {{"task": {TASK!r}, "n_dims": 3, "depth": 2}}
        records = {{("a", 0): {{"recipe": recipe}}, ("a", 1): {{"recipe": recipe}}}}
        check_pairing(SimpleNamespace(arms={{"a": {{}}}}), records)
        print("paired")
        """
    )
    analysed = _run(attacker.parent, "-c", script)
    assert analysed.returncode == 0 and "paired" in analysed.stdout, analysed.stderr[-2000:]
    assert not attacker.exists()
