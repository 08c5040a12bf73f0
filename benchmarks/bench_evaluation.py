"""Speed of the few-shot evaluation against a refit-per-prefix reference (a benchmark, not a test).

    python benchmarks/bench_evaluation.py [--n_prompts 1280 --n_dims 20 --n_points 41 \
        --reference_prompts 64 --threads 2]

Ours: the model's whole curve from one forward per batch, and least squares (one batched
``lstsq`` per k), averaging and 3-nearest neighbours vectorised over prompts (``icl_conml.
evaluation``). Reference, in the same process on the same prompts: the model run once per
prefix length (a forward per k, as an evaluator that ignores causality does), and every
estimator refitted per prompt and per prefix in a Python loop (least squares by ``pinv`` as
in Garg et al.'s code). The reference is timed on ``--reference_prompts`` prompts and scaled
linearly to ``--n_prompts`` (its cost is linear in the prompts); it also checks that both
give the same predictions. Model: Garg et al.'s standard GPT-2 (n_embd 256, 12 layers,
8 heads), randomly initialised: the timing does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from icl_conml import ICLConfig, ICLModel
from icl_conml.baselines import parse_baseline
from icl_conml.data import sample_prompts
from icl_conml.evaluation.predictions import baseline_predictions, model_predictions
from icl_conml.tasks import get_task


def reference_least_squares(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(ys.shape)
    for b in range(xs.shape[0]):
        for k in range(1, xs.shape[1]):
            w = torch.linalg.pinv(xs[b, :k]) @ ys[b, :k]
            out[b, k] = xs[b, k] @ w
    return out


def reference_averaging(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(ys.shape)
    for b in range(xs.shape[0]):
        for k in range(1, xs.shape[1]):
            w = (ys[b, :k, None] * xs[b, :k]).mean(0)
            out[b, k] = xs[b, k] @ w
    return out


def reference_knn(xs: torch.Tensor, ys: torch.Tensor, n_neighbors: int = 3) -> torch.Tensor:
    out = torch.zeros(ys.shape)
    for b in range(xs.shape[0]):
        for k in range(1, xs.shape[1]):
            distances = (xs[b, :k] - xs[b, k]).norm(dim=-1)
            nearest = distances.argsort()[:n_neighbors]
            out[b, k] = ys[b, :k][nearest].mean()
    return out


@torch.no_grad()
def reference_model(model: ICLModel, xs: torch.Tensor, ys: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = torch.zeros(ys.shape)
    for start in range(0, xs.shape[0], batch_size):
        for k in range(xs.shape[1]):
            chunk = slice(start, start + batch_size)
            out[chunk, k] = model(xs=xs[chunk, : k + 1], ys=ys[chunk, : k + 1]).predictions[:, k]
    return out


CPU_SECONDS: dict[str, float] = {}


def timed(fn, *args, label: str = ""):
    """(value, wall seconds); the process CPU seconds go to CPU_SECONDS[label] (on a shared
    machine wall time depends on the other jobs, CPU time much less)."""
    start, cpu = time.perf_counter(), time.process_time()
    value = fn(*args)
    CPU_SECONDS[label] = time.process_time() - cpu
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_prompts", type=int, default=1280)
    parser.add_argument("--n_dims", type=int, default=20)
    parser.add_argument("--n_points", type=int, default=41)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument(
        "--reference_prompts", type=int, default=64, help="Prompts the reference is timed on."
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="Our model forward."
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"threads {torch.get_num_threads()}, load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )

    torch.manual_seed(0)
    config = ICLConfig(n_dims=args.n_dims, n_positions=args.n_points, n_embd=256, n_layer=12, n_head=8)
    model = ICLModel(config).eval()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    task = get_task("linear_regression", args.n_dims)
    prompts = sample_prompts(task, args.n_prompts, args.n_points, seed=0)
    specs = {name: parse_baseline(name, task) for name in ("least_squares", "averaging", "knn")}

    ours = {}
    predictions = {}
    predictions["model"], ours["model"] = timed(
        model_predictions, model, prompts, args.batch_size, args.dtype, label="model"
    )
    for name, spec in specs.items():
        predictions[name], ours[name] = timed(baseline_predictions, spec, prompts, label=name)

    subset = args.reference_prompts
    xs, ys = prompts.xs[:subset], prompts.ys[:subset]
    scale = args.n_prompts / subset
    reference, agreement = {}, {}
    functions = {
        "least_squares": reference_least_squares,
        "averaging": reference_averaging,
        "knn": reference_knn,
    }
    value, seconds = timed(reference_model, model, xs, ys, min(args.batch_size, subset))
    reference["model"], agreement["model"] = (
        seconds * scale,
        (value - predictions["model"][:subset]).abs().max(),
    )
    for name, fn in functions.items():
        value, seconds = timed(fn, xs, ys)
        reference[name] = seconds * scale
        agreement[name] = (value - predictions[name][:subset]).abs().max()

    print(
        f"\n{args.n_prompts} prompts, d={args.n_dims}, {args.n_points} points; reference timed on {subset} prompts ×{scale:g}"
    )
    print(f"{'estimator':<15}{'ours (s)':>10}{'reference (s)':>15}{'speed-up':>10}{'max |Δ prediction|':>20}")
    for name in ours:
        print(
            f"{name:<15}{ours[name]:>10.2f}{reference[name]:>15.1f}{reference[name] / ours[name]:>9.1f}×"
            f"{agreement[name].item():>20.2e}"
        )
    total, total_reference = sum(ours.values()), sum(reference.values())
    print(f"{'total':<15}{total:>10.2f}{total_reference:>15.1f}{total_reference / total:>9.1f}×")
    cpu = sum(CPU_SECONDS[name] for name in ours)
    print(
        f"ours: {cpu:.1f} CPU-seconds over {args.threads} threads (≈ {cpu / args.threads:.1f} s wall on idle cores)"
    )
    print(
        f"target: total ≤ 30 s ({'met' if total <= 30 else 'NOT met'}), speed-up ≥ 20× "
        f"({'met' if total_reference / total >= 20 else 'NOT met'})"
    )
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
