"""``torch_compile: true`` against eager PyTorch: the whole ``trainer.train()``, interleaved.

Each run is a fresh process (``build_trainer(recipe).train()`` of
``recipes/quickstart.yaml`` for ``--steps`` steps, no evaluation or saving), so every compiled
run pays its compilation, as a user's run does. Compiled runs get an empty inductor cache
(``TORCHINDUCTOR_CACHE_DIR``) unless ``--warm_cache``: the first run of a model on a machine.
Runs alternate (eager, compiled, compiled, eager, ...) over ``--repeats`` pairs, with and
without ConML. Printed per configuration: the median ``train_runtime`` and its range, the
median steady step time (steps after the first ``--skip`` ones), the compile overhead
(compiled first-``--skip``-steps time minus eager's) and the break-even step count.

    python benchmarks/bench_compile.py [--steps 300] [--repeats 5] [--threads 2] [-- extra train flags]
    python benchmarks/bench_compile.py --from_log LOG   # the summary of an earlier run's log
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace, extra: list[str]) -> None:
    """One training run; prints a JSON line (timings, losses, graphs compiled)."""
    import torch
    from transformers import TrainerCallback

    from icl_conml.recipe_parser import parse_recipe
    from icl_conml.train import build_trainer

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as scratch:
        recipe = parse_recipe(
            [
                str(REPO / "recipes" / "quickstart.yaml"), "--max_steps", str(args.steps),
                "--conml_lambda", str(args.conml_lambda), "--torch_compile", str(args.compile).lower(),
                "--output_dir", scratch, "--eval_strategy", "no", "--save_strategy", "no",
                "--eval_n_prompts", "0", "--logging_steps", str(args.steps), "--report_to", "none",
                "--disable_tqdm", "true", *extra,
            ]
        )  # fmt: skip
        start = time.perf_counter()
        timer = StepTimes()
        trainer = build_trainer(recipe, callbacks=[timer])
        output = trainer.train()
        wall = time.perf_counter() - start
    counters = torch._dynamo.utils.counters
    print(
        json.dumps(
            {
                "train_runtime": output.metrics["train_runtime"],
                "wall": wall,
                "first_steps": sum(timer.times[: args.skip]),
                "steady_step": statistics.median(timer.times[args.skip :]),
                "train_loss": output.metrics["train_loss"],
                "graphs": counters["stats"]["unique_graphs"],
                "recompiles": sum(counters["recompiles"].values()),
            }
        )
    )


def run_one(args: argparse.Namespace, extra: list[str], compiled: bool, conml_lambda: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as cache:
        if compiled and not args.warm_cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        command = [
            sys.executable, __file__, "_worker", "--steps", str(args.steps), "--skip", str(args.skip),
            "--compile", str(compiled), "--conml_lambda", str(conml_lambda), *(["--", *extra] if extra else []),
        ]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def summarize(conml_lambda: float, eager: list[dict], comp: list[dict], skip: int) -> None:
    """Medians and ranges over the pairs (the i-th eager and i-th compiled run ran side by side)."""
    pairs = list(zip(eager, comp, strict=False))  # a log cut short: the complete pairs
    if not pairs:
        print(f"conml_lambda {conml_lambda}: no complete pair yet")
        return
    ratios = [c["train_runtime"] / e["train_runtime"] for e, c in pairs]
    step_ratios = [c["steady_step"] / e["steady_step"] for e, c in pairs]
    overheads = [c["first_steps"] - e["first_steps"] for e, c in pairs]
    savings = [e["steady_step"] - c["steady_step"] for e, c in pairs]
    overhead, saving = statistics.median(overheads), statistics.median(savings)
    breakeven = f"{skip + overhead / saving:.0f} steps" if saving > 0 else "never (no per-step saving)"
    print(f"conml_lambda {conml_lambda} ({len(pairs)} pairs; median [min, max]):")
    print(f"  train_runtime s, eager    {summary([e['train_runtime'] for e, _ in pairs])}")
    print(f"  train_runtime s, compiled {summary([c['train_runtime'] for _, c in pairs])}")
    print(f"  compiled / eager train_runtime {summary(ratios)}")
    print(f"  steady step ms, eager    {summary([1e3 * e['steady_step'] for e, _ in pairs])}")
    print(f"  steady step ms, compiled {summary([1e3 * c['steady_step'] for _, c in pairs])}")
    print(f"  compiled / eager steady step {summary(step_ratios)}")
    print(
        f"  compile overhead (first {skip} steps, compiled - eager) s {summary(overheads)}; pays after {breakeven}"
    )
    print(f"  graphs compiled {[c['graphs'] for c in comp]}")
    print(f"  train_loss eager {[round(e['train_loss'], 5) for e in eager][:2]}, "
          f"compiled {[round(c['train_loss'], 5) for c in comp][:2]}")  # fmt: skip


def from_log(path: str, skip: int) -> None:
    """Summarize the runs printed in a log of this script (its ``lambda L compiled B: {...}`` lines)."""
    runs: dict[float, dict[bool, list[dict]]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip().startswith("lambda ") and ": {" in line:
            head, _, row = line.strip().partition(": ")
            _, value, _, compiled = head.split()
            runs.setdefault(float(value), {False: [], True: []})[compiled == "True"].append(json.loads(row))
    for conml_lambda, results in runs.items():
        summarize(conml_lambda, results[False], results[True], skip)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "_worker"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip", type=int, default=20, help="first steps left out of the steady step time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warm_cache", action="store_true", help="reuse the inductor cache between runs")
    parser.add_argument("--conml", type=float, nargs="+", default=[0.0, 0.02], help="conml_lambda values")
    parser.add_argument("--from_log", help="summarize the runs printed in an earlier log of this script")
    parser.add_argument("--compile", type=lambda s: s == "True", default=False, help=argparse.SUPPRESS)
    parser.add_argument("--conml_lambda", type=float, default=0.0, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    extra = [flag for flag in extra if flag != "--"]
    if args.mode == "_worker":
        worker(args, extra)
        return
    if args.from_log:
        from_log(args.from_log, args.skip)
        return
    print(f"steps {args.steps}, repeats {args.repeats}, threads {args.threads}, warm cache {args.warm_cache}")
    for conml_lambda in args.conml:
        results: dict[bool, list[dict]] = {False: [], True: []}
        for repeat in range(args.repeats):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            for compiled in order:
                row = run_one(args, extra, compiled, conml_lambda)
                results[compiled].append(row)
                print(f"  lambda {conml_lambda} compiled {compiled}: {json.dumps(row)}", flush=True)
        summarize(conml_lambda, results[False], results[True], args.skip)


if __name__ == "__main__":
    main()
