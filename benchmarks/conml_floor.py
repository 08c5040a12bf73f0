"""What the paper's ConML term can do at the study's setting (issue 23, docs/results.md).

Two parts, both fast (a few seconds) and deterministic:

1. **Exact least squares**, by Monte Carlo. Least squares is the optimal learner for noiseless
   linear regression, so the values of d_in and d_out it gives are those of a model that has
   learned the task. Each simulated training step draws, like ``recipes/experiments/cpu_base.yaml``
   (d = 5, 11 points per prompt, batch 64): B tasks w ~ N(0, I_d), n points x ~ N(0, I_d),
   y = w·x, and one probe u ~ N(0, I_d) shared by the batch. The anchor is least squares fitted
   on all n pairs (the whole context), the view is least squares on the first ⌊n/2⌋ pairs
   (``prefix_half``), both read at u; d_in = mean φ(view, anchor) and d_out = mean φ(a_i, a_j)
   over pairs of distinct tasks, φ the project's ``sigmoid_sq`` (σ((a − b)²)).
2. **The records** of an arm (default: the paper's setting, ``docs/study/lr_cpu/paper``): per
   seed, at the last logged step, d_in, d_out, the ICL loss and the ConML term's share of it,
   λ·|d_in − d_out| / ICL loss; and for a run that stayed on the plateau (minimum final error
   > 0.5) the largest |d − 1/2| it logged after step 1000, with the root-mean-square gap
   between two tasks' probe predictions it implies (σ(z²) ≈ 1/2 + z²/4 for small z).

Why the gradient vanishes on the plateau: ∂σ((a − b)²)/∂a = 2(a − b)·σ'((a − b)²), which is 0 at
a = b; on the plateau every prediction is ≈ 0, so every a − b is ≈ 0. The script checks it with
autograd.

    python benchmarks/conml_floor.py [--steps 2000] [--seed 0] [--records docs/study/lr_cpu/paper]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
from pathlib import Path

import torch

from icl_conml.conml import sigmoid_sq

ROOT = Path(__file__).resolve().parent.parent


def least_squares_distances(
    steps: int, batch: int, n_dims: int, n_points: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Per simulated step: d_in, d_out and the mean squared gap (a_i − a_j)² of least squares;
    and the largest |view − anchor| (0 up to rounding: ⌊n/2⌋ ≥ d points determine w exactly)."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(steps, batch, n_dims, generator=generator, dtype=torch.float64)
    xs = torch.randn(steps, batch, n_points, n_dims, generator=generator, dtype=torch.float64)
    u = torch.randn(steps, 1, n_dims, generator=generator, dtype=torch.float64)
    ys = torch.einsum("sbnd,sbd->sbn", xs, w).unsqueeze(-1)
    half = n_points // 2
    fit_all = torch.linalg.lstsq(xs, ys).solution.squeeze(-1)  # (steps, batch, d)
    fit_half = torch.linalg.lstsq(xs[:, :, :half], ys[:, :, :half]).solution.squeeze(-1)
    anchor = (fit_all * u).sum(-1)  # (steps, batch): the prediction at the probe
    view = (fit_half * u).sum(-1)
    d_in = sigmoid_sq(view.unsqueeze(-1), anchor.unsqueeze(-1)).mean(-1)
    pairwise = sigmoid_sq(anchor[:, :, None, None], anchor[:, None, :, None])  # (steps, B, B)
    gaps = (anchor[:, :, None] - anchor[:, None, :]).square()
    distinct = ~torch.eye(batch, dtype=torch.bool)
    largest = float((view - anchor).abs().max())
    return d_in, pairwise[:, distinct].mean(-1), gaps[:, distinct].mean(-1), largest


def gradient_at_identical() -> float:
    """∂φ(a, b)/∂a at a = b for φ = sigmoid_sq (exactly 0)."""
    a = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    sigmoid_sq(a, torch.zeros(1, 1, dtype=torch.float64)).sum().backward()
    return float(a.grad)


def report_records(folder: Path) -> None:
    """The term's size in an arm's records, and the plateau runs' distances."""
    print(f"\nrecords: {folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}")
    print("seed  step  d_in      d_out     ICL loss  λ·(d_in − d_out)  share of ICL loss")
    shares = []
    for path in sorted(glob.glob(str(folder / "seed*.json")), key=lambda p: int(Path(p).stem[4:])):
        record = json.loads(Path(path).read_text())
        weight = record["recipe"]["conml_lambda"]
        last = record["train_log"][-1]
        term = weight * (last["d_in"] - last["d_out"])
        share = abs(term) / last["icl_loss"]
        on_plateau = min(record["final_curve"]["mean"]) > 0.5
        if not on_plateau:
            shares.append(share)
        print(
            f"{record['seed']:>4}  {last['step']:>4}  {last['d_in']:.6f}  {last['d_out']:.6f}  "
            f"{last['icl_loss']:8.3f}  {term:+.6f}         {100 * share:.3f}%"
            + ("  (plateau)" if on_plateau else "")
        )
        if on_plateau:
            late = [e for e in record["train_log"] if e["step"] > 1000]
            largest = max(max(abs(e["d_in"] - 0.5), abs(e["d_out"] - 0.5)) for e in late)
            print(
                f"      plateau run: after step 1000 every logged d_in and d_out is within {largest:.6f} "
                f"of 1/2; rms gap between two tasks' predictions ≈ {math.sqrt(4 * largest):.4f} at most"
            )
    if shares:
        print(
            f"runs past the plateau: the term is {100 * min(shares):.3f}%–{100 * max(shares):.3f}% "
            f"of the ICL loss (median {100 * statistics.median(shares):.3f}%)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="simulated training steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n_dims", type=int, default=5)
    parser.add_argument("--n_points", type=int, default=11)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--records", type=Path, default=ROOT / "docs/study/lr_cpu/paper")
    args = parser.parse_args()

    d_in, d_out, gaps, largest = least_squares_distances(
        args.steps, args.batch, args.n_dims, args.n_points, args.seed
    )

    def mean_se(values: torch.Tensor) -> str:
        return f"{float(values.mean()):.4f} ± {float(values.std() / math.sqrt(len(values))):.4f}"

    print(
        f"exact least squares, d = {args.n_dims}, anchor on {args.n_points} pairs, view on the first "
        f"{args.n_points // 2}, batch {args.batch}, {args.steps} steps (mean ± standard error over steps):"
    )
    print(f"  d_in  = {mean_se(d_in)} (largest |view − anchor| over all tasks: {largest:.1e})")
    print(f"  d_out = {mean_se(d_out)}")
    print(
        f"  d_in − d_out = {mean_se(d_in - d_out)}; rms gap between two tasks' predictions {math.sqrt(gaps.mean()):.3f}"
    )
    print(f"∂σ((a − b)²)/∂a at a = b: {gradient_at_identical()}")
    report_records(args.records.resolve())


if __name__ == "__main__":
    main()
