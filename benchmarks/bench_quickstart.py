"""Quickstart: wall time and error curve of ``recipes/quickstart.yaml`` on several seeds.

For each seed, trains the quickstart exactly as a user does (``python -m icl_conml.train
recipes/quickstart.yaml --seed S`` in a subprocess, default threads), then evaluates it with the
evaluation CLI on 1280 fresh prompts (seed 0) and prints the model's error at k = d and k = 2d
against least squares (the optimal estimator, measured on the same prompts). The summary is the
median over seeds and its range: one seed alone is not a measurement of a default, because
seeds of the same recipe differ by up to 3.7x at k = 2d (docs/benchmarks.md section 4).
Target (issue 25): median error <= 0.02 at k = 2d within 5 minutes of training on 2 CPU cores.

    python benchmarks/bench_quickstart.py [--seeds 42 1 2] [--output_dir outputs/bench_quickstart]
    python benchmarks/bench_quickstart.py --skip_training --output_dir DIR   # DIR: a trained run
    python benchmarks/bench_quickstart.py -- --n_points 16                   # extra train flags
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}


def train(out: Path, seed: int, flags: list[str]) -> float:
    """Trains the quickstart with ``seed`` into ``out``; returns the command's wall time."""
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "icl_conml.train", str(REPO / "recipes" / "quickstart.yaml")]
    command += ["--output_dir", str(out), "--disable_tqdm", "true", "--seed", str(seed), *flags]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=ENV, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    (out / "bench_wall_time.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def evaluate(out: Path) -> dict:
    """The evaluation CLI's results.json for the run in ``out`` (1280 prompts, seed 0)."""
    evaluation = out / "eval"
    command = [sys.executable, "-m", "icl_conml.evaluation", "--model", str(out)]
    command += ["--output_dir", str(evaluation), "--n_prompts", "1280", "--seed", "0", "--log_scale"]
    subprocess.run(command, check=True, env=ENV, stdout=subprocess.DEVNULL)
    return json.loads((evaluation / "results.json").read_text())


def report(name: str, results: dict, seconds: float | None) -> dict[str, float]:
    """Prints one run's curve; returns its error at k = d and k = 2d (those the prompts reach)."""
    d = results["metadata"]["n_dims"]
    model, least_squares = results["curves"]["model"], results["curves"]["least_squares"]
    wall = f", training wall time {seconds:.0f} s" if seconds is not None else ""
    print(f"{name}: d={d}, n_points={len(model)}{wall}")
    print("  k        " + " ".join(f"{k:>6d}" for k in range(len(model))))
    print("  model    " + " ".join(f"{e:6.3f}" for e in model))
    print("  least sq " + " ".join(f"{e:6.3f}" for e in least_squares))
    print(f"  needed context length (error <= 0.1): {results['needed_context_length']['absolute']}")
    return {label: model[k] for label, k in (("d", d), ("2d", 2 * d)) if k < len(model)}


def spread(values: list[float], fmt: str) -> str:
    """``median [min, max]`` of ``values`` (``n/a`` for none)."""
    if not values:
        return "n/a"
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", default=str(REPO / "outputs" / "bench_quickstart"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument(
        "--skip_training", action="store_true", help="evaluate the existing run in --output_dir"
    )
    parser.add_argument("train_flags", nargs="*", help="extra flags for icl_conml.train (after --)")
    args = parser.parse_args()
    out = Path(args.output_dir)
    print(
        f"threads: {os.environ.get('OMP_NUM_THREADS', 'default')}; train flags: {args.train_flags or 'none'}"
    )

    if args.skip_training:
        wall_file = out / "bench_wall_time.json"
        seconds = json.loads(wall_file.read_text())["seconds"] if wall_file.exists() else None
        report(str(out), evaluate(out), seconds)
        return

    errors: dict[str, list[float]] = {"d": [], "2d": []}
    walls = []
    for seed in args.seeds:
        run = out / f"seed-{seed}"
        seconds = train(run, seed, args.train_flags)
        for label, error in report(f"seed {seed}", evaluate(run), seconds).items():
            errors[label].append(error)
        walls.append(seconds)
    print(f"median over seeds {args.seeds} [min, max]:")
    print(f"  training wall time: {spread(walls, '.0f')} s (target <= 300 s)")
    print(f"  error at k = d:     {spread(errors['d'], '.3f')}")
    print(f"  error at k = 2d:    {spread(errors['2d'], '.3f')} (target: median <= 0.02)")


if __name__ == "__main__":
    main()
