"""Seconds per training step of quickstart variants, relative to the quickstart itself.

Used to give each variant the quickstart's compute budget (its 8000 steps) when searching for a
better CPU default (docs/benchmarks.md, "The quickstart's default"). Each variant's trainer is
``build_trainer`` of ``recipes/quickstart.yaml`` plus the variant's flags; variants alternate
round by round, so background load hits them alike; the median over rounds is reported.

    python benchmarks/bench_quickstart_step_cost.py [--steps 40] [--rounds 3]
    python benchmarks/bench_quickstart_step_cost.py --variant "plain=--conml_lambda 0" --variant ...

``--variant NAME=FLAGS`` (repeatable) measures the quickstart against these variants instead of
the built-in list.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step_time import StepClock, make_trainer  # noqa: E402

QUICKSTART = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
VARIANTS: dict[str, list[str]] = {
    "quickstart": [],
    "batch 128": ["--per_device_train_batch_size", "128"],
    "batch 256": ["--per_device_train_batch_size", "256"],
    "n_embd 128": ["--n_embd", "128"],
    "8 layers": ["--n_layer", "8"],
    "6 layers, n_embd 96": ["--n_embd", "96", "--n_layer", "6"],
}


def seconds_per_step(flags: list[str], steps: int) -> float:
    """Seconds per step of ``train()``, its first step left out."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = make_trainer([QUICKSTART, *flags, "--max_steps", str(steps + 1)], tmp)
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
    return (clock.times[-1] - clock.times[0]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS")
    args = parser.parse_args()
    variants = VARIANTS
    if args.variant:
        variants = {"quickstart": []}
        for spec in args.variant:
            name, _, flags = spec.partition("=")
            variants[name] = flags.split()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, flags in variants.items():
            times[name].append(seconds_per_step(flags, args.steps))
    reference = statistics.median(times["quickstart"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:22s} {1e3 * median:7.1f} ms/step  {median / reference:.2f}x the quickstart  "
            f"[{1e3 * min(values):.1f}, {1e3 * max(values):.1f}]"
        )


if __name__ == "__main__":
    main()
