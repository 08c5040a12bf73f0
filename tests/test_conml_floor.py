"""benchmarks/conml_floor.py: least squares' d_in and d_out, and the script's report on the records."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "conml_floor.py"


def test_least_squares_view_equals_anchor_only_when_the_view_determines_w(load_script):
    floor = load_script("benchmarks/conml_floor.py")
    # 11 points: the prefix-half view holds 5 = d pairs, which determine w; d_in is σ(0) = 1/2.
    d_in, d_out, gaps, largest = floor.least_squares_distances(50, 16, 5, 11, seed=0)
    assert largest < 1e-6
    assert float((d_in - 0.5).abs().max()) < 1e-12
    assert 0.8 < float(d_out.mean()) < 0.9
    assert 8.0 < float(gaps.mean()) < 12.0  # E[(a_i − a_j)²] = 2·E|u|² = 2d
    # 7 points: the view holds 3 < d pairs; its minimum-norm fit misses w, so d_in rises above 1/2.
    d_in, _, _, largest = floor.least_squares_distances(50, 16, 5, 7, seed=0)
    assert largest > 0.1
    assert float(d_in.mean()) > 0.55


def test_gradient_of_sigmoid_sq_vanishes_at_identical_predictions(load_script):
    assert load_script("benchmarks/conml_floor.py").gradient_at_identical() == 0.0


def test_script_reports_the_records(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "20"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    out = result.stdout
    assert "d_in  = 0.5000" in out
    assert "   3  4000  0.500004  0.500010" in out and "(plateau)" in out
    assert "runs past the plateau: the term is 0.223%–0.301% of the ICL loss (median 0.279%)" in out
