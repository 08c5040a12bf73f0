"""Quickstart: wall time and error curve of ``recipes/quickstart.yaml``, next to least squares.

Trains the quickstart exactly as a user does (``python -m icl_conml.train recipes/quickstart.yaml``
in a subprocess), then evaluates it with the evaluation CLI on 1280 fresh prompts and prints
the model's error at k = d and k = 2d against least squares (the optimal estimator, measured
on the same prompts). Target: error <= 0.05 at k = 2d within 10 minutes on 2 CPU cores.

    python benchmarks/bench_quickstart.py [--output_dir outputs/bench_quickstart] [-- extra train flags]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", default=str(REPO / "outputs" / "bench_quickstart"))
    parser.add_argument("--skip_training", action="store_true", help="evaluate an existing run")
    parser.add_argument("train_flags", nargs="*", help="extra flags for icl_conml.train (after --)")
    args = parser.parse_args()
    out = Path(args.output_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}

    seconds = None
    if not args.skip_training:
        if out.exists():
            shutil.rmtree(out)
        command = [sys.executable, "-m", "icl_conml.train", str(REPO / "recipes" / "quickstart.yaml")]
        command += ["--output_dir", str(out), "--disable_tqdm", "true", *args.train_flags]
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        (out / "bench_wall_time.json").write_text(json.dumps({"seconds": seconds}))

    evaluation = out / "eval"
    command = [
        sys.executable,
        "-m",
        "icl_conml.evaluation",
        "--model",
        str(out),
        "--output_dir",
        str(evaluation),
    ]
    command += ["--n_prompts", "1280", "--seed", "0", "--log_scale"]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    results = json.loads((evaluation / "results.json").read_text())
    d = results["metadata"]["n_dims"]
    model, least_squares = results["curves"]["model"], results["curves"]["least_squares"]

    if seconds is None and (out / "bench_wall_time.json").exists():
        seconds = json.loads((out / "bench_wall_time.json").read_text())["seconds"]
    print(f"quickstart: d={d}, n_points={len(model)}, threads={os.environ.get('OMP_NUM_THREADS', 'default')}")
    if seconds is not None:
        print(f"training wall time: {seconds:.0f} s ({seconds / 60:.1f} min; target <= 10 min)")
    print("k        " + " ".join(f"{k:>6d}" for k in range(len(model))))
    print("model    " + " ".join(f"{e:6.3f}" for e in model))
    print("least sq " + " ".join(f"{e:6.3f}" for e in least_squares))
    for k in (d, 2 * d):
        if k < len(model):
            print(f"error at k={k}: model {model[k]:.4f}, least squares {least_squares[k]:.2e}")
    print(f"needed context length (error <= 0.1): {results['needed_context_length']['absolute']}")


if __name__ == "__main__":
    main()
