"""benchmarks/bench_plateau_escape.py and last_position_error.py: what their numbers come from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_plateau_escape.py"
TINY = ["--n_embd", "16", "--n_layer", "1", "--n_head", "2", "--logging_steps", "10"]


def test_training_errors_stop_early_on_the_variants_schedule(load_script):
    errors = load_script("benchmarks/bench_plateau_escape.py").training_errors(
        [*TINY, "--max_steps", "1000"], seed=3, stop=30
    )
    assert sorted(errors) == [10, 20, 30]  # stopped at 30 of the schedule's 1000 steps
    assert all(0.5 < error < 2.0 for error in errors.values())  # d = 5, predicting ~0: about 1


def test_command_prints_one_line_per_seed():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--seeds", "0", "1", "--stop", "20", "--", *TINY, "--max_steps", "40"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("seed ")]
    assert [line.split(":")[0] for line in lines] == ["seed 0", "seed 1"]
    assert "from step never" in lines[0]  # 20 tiny steps do not leave the plateau


def test_last_position_error_reads_records_and_leaves_out_plateau_runs(tmp_path, load_script):
    module = load_script("benchmarks/last_position_error.py")
    runs = {"a": [0.4, 0.2, 0.1, 0.12], "b": [0.4, 0.2, 0.1, 0.08], "plateau": [1.0, 1.0, 1.0, 1.0]}
    for name, curve in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"final_curve": {"mean": curve}}))
    (tmp_path / "analysis.json").write_text(json.dumps({"table": []}))  # not a run record
    summary = module.last_position_summary(module.curves(tmp_path), max_error=0.3)
    assert summary["runs"] == 2 and summary["last_above"] == 1
    assert abs(summary["last_ratio"] - 1.0) < 1e-12  # median of 1.2 and 0.8
    assert abs(summary["before_ratio"] - 0.5) < 1e-12
    assert module.last_position_summary([], 0.3) is None
