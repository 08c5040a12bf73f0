"""End-to-end cost of ConML: the whole ``trainer.train()`` of the quickstart, ConML vs plain.

What a user waits for: ``ConMLTrainer.train()`` of ``recipes/quickstart.yaml`` (d = 5,
11 points, GPT-2 64/4/4, batch 64, eager attention) for ``--steps`` steps, including prompt,
probe and view sampling, the ConML layout, logging, gradient clipping and the optimizer. Each
round trains every variant once, in an order that alternates between rounds (ABBA…), and each
variant's ratio is taken against the plain run *of the same round*: on a shared machine the
background load drifts, and interleaving is what keeps the ratio meaningful. Printed per
round, then the median ratio with its spread (min, max, interquartile range).

Variants: ``plain`` (conml_lambda 0), ``paper`` (conml_lambda 0.02, every other key at its
default: one probe, the first-half view as masked probe tokens), and the views that need real
extra tokens, ``shuffle`` and ``random_subset``, whose cost is compared with their token ratio
(tokens per task the backbone processes, context + probes + views, against plain).
``shuffle_packed`` and ``random_subset_rows`` (on request) run the same views in the other
layout: shuffles packed after the main sequence behind a block mask (as before views got their
own batch rows), subsets in their own rows by a second backbone call.

Besides the wall clock, each run's CPU time (``time.process_time``) is recorded: with one
thread it equals the wall clock on an idle machine, and on a loaded one it leaves out the time
spent waiting for a core, so its ratio is the steadier of the two.

``--step_blocks N`` measures the model's own cost instead: N interleaved rounds of short blocks
of ``training_step`` + AdamW per variant, CPU time per step (min and median). ``--profile N``
runs N steps of each variant under cProfile and lists where its CPU time differs from plain's.

    OMP_NUM_THREADS=1 python benchmarks/bench_end_to_end.py [--steps 300] [--rounds 5] [--threads 1]
        [--variants paper,shuffle,random_subset,shuffle_packed,random_subset_rows] [--step_blocks 15] [--profile 200]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from icl_conml import conml  # noqa: E402
from icl_conml.recipe_parser import parse_recipe  # noqa: E402
from icl_conml.train import build_trainer  # noqa: E402
from icl_conml.trainer import ConMLTrainer  # noqa: E402

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "quickstart.yaml")
VARIANTS: dict[str, list[str]] = {
    "plain": ["--conml_lambda", "0"],
    "paper": ["--conml_lambda", "0.02"],
    "shuffle": ["--conml_lambda", "0.02", "--conml_views", "shuffle"],
    "random_subset": ["--conml_lambda", "0.02", "--conml_views", "random_subset"],
    # For comparison (not run by default): the other layout of the same views. Shuffles packed
    # after the main sequence behind a block mask (as before views got their own batch rows);
    # subsets in their own rows, run by a second backbone call.
    "shuffle_packed": ["--conml_lambda", "0.02", "--conml_views", "shuffle"],
    "random_subset_rows": ["--conml_lambda", "0.02", "--conml_views", "random_subset"],
}
DEFAULT_VARIANTS = ("plain", "paper", "shuffle", "random_subset")
VIEW_ROWS = {"shuffle_packed": False, "random_subset_rows": True}


@contextlib.contextmanager
def view_rows(name: str) -> Iterator[None]:
    """For the comparison variants, ``conml.build_layout`` with ``view_rows`` forced."""
    if name not in VIEW_ROWS:
        yield
        return
    build = conml.build_layout
    conml.build_layout = functools.partial(build, view_rows=VIEW_ROWS[name])
    try:
        yield
    finally:
        conml.build_layout = build


def make_trainer(extra: list[str], steps: int, output_dir: str) -> ConMLTrainer:
    """The quickstart's trainer as ``python -m icl_conml.train`` builds it, without checkpoints."""
    recipe = parse_recipe(
        [
            RECIPE,
            *extra,
            "--max_steps",
            str(steps),
            "--output_dir",
            output_dir,
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
        ]
    )
    return build_trainer(recipe)


def timed_train(name: str, steps: int) -> tuple[float, float]:
    """Wall-clock and CPU seconds of ``trainer.train()`` (a fresh model and trainer each time).

    CPU time (``time.process_time``: this process's threads) is what the run itself spent; on a
    shared machine it varies less than the wall clock, which also counts time spent waiting for
    a core.
    """
    with tempfile.TemporaryDirectory() as tmp, view_rows(name):
        trainer = make_trainer(VARIANTS[name], steps, tmp)
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.train()
        return time.perf_counter() - start, time.process_time() - start_cpu


def tokens_per_task(extra: list[str]) -> int:
    """Tokens of one task the backbone processes in a training step: context, probes, views."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(extra, 1, tmp)
    batch = trainer.train_dataset.micro_batch(0, 0, 1)
    settings = trainer.conml_args
    if not settings.enabled:
        return 2 * batch["xs"].shape[1]
    layout = conml.build_layout(
        batch["xs"],
        batch["ys"],
        batch["probes"],
        batch["view_index"],
        settings.conml_views,
        settings.conml_prefix_mode,
    )
    return layout.tokens_per_task


def spread(values: list[float]) -> dict[str, float]:
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": quartiles[0],
        "q3": quartiles[2],
    }


def step_blocks(names: list[str], rounds: int, block: int) -> None:
    """The model's own cost per variant, without the training loop around it: blocks of
    ``block`` steps of ``training_step`` + AdamW, one block per variant per round, interleaved;
    CPU time per step, min and median over the rounds. Finer than whole runs: it resolves the
    few-percent differences between layouts that the load's drift hides in whole runs."""
    trainers = {}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(VARIANTS[name], 10**6, tmp)
        trainer.model.train()
        trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
        trainer.current_gradient_accumulation_steps = 1
        trainers[name] = trainer
    steps = iter(range(10**9))

    def run_block(name: str) -> float:
        trainer = trainers[name]
        with view_rows(name):
            start = time.process_time()
            for _ in range(block):
                batch = trainer.train_dataset.micro_batch(next(steps), 0, 1)
                trainer.training_step(trainer.model, batch)
                trainer.optimizer.step()
                trainer.optimizer.zero_grad()
            return (time.process_time() - start) / block

    for name in names:
        run_block(name)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            seconds[name].append(run_block(name))
    best, middle = min(seconds["plain"]), statistics.median(seconds["plain"])
    print(f"\nstep blocks: {rounds} rounds of {block} steps, CPU time per step")
    print("| variant | ms/step (min) | vs plain (min) | ms/step (median) | vs plain (median) |")
    print("|---|---|---|---|---|")
    for name in names:
        low, mid = min(seconds[name]), statistics.median(seconds[name])
        print(f"| {name} | {low * 1e3:.1f} | {low / best:.3f}× | {mid * 1e3:.1f} | {mid / middle:.3f}× |")


def profile_runs(names: list[str], steps: int, top: int = 15) -> None:
    """cProfile (CPU time) of ``trainer.train()`` for each variant; prints, per variant, the
    functions whose own time per step differs most from plain's: where its extra cost goes."""
    import cProfile
    import pstats

    own: dict[str, dict[str, float]] = {}
    for name in names:
        timed_train(name, 20)  # warm-up
        with tempfile.TemporaryDirectory() as tmp, view_rows(name):
            trainer = make_trainer(VARIANTS[name], steps, tmp)
            profiler = cProfile.Profile(time.process_time)
            profiler.runcall(trainer.train)
        stats = pstats.Stats(profiler).stats
        own[name] = {
            f"{path.split('site-packages/')[-1]}:{line}({function})": entry[2] / steps
            for (path, line, function), entry in stats.items()
        }
        print(f"{name}: {sum(own[name].values()) * 1e3:.1f} ms CPU per step under cProfile")
    for name in names[1:]:
        keys = set(own[name]) | set(own["plain"])
        diff = {key: own[name].get(key, 0.0) - own["plain"].get(key, 0.0) for key in keys}
        print(f"\n{name} - plain, own CPU time per step (ms), largest differences:")
        for key in sorted(diff, key=lambda key: -abs(diff[key]))[:top]:
            print(f"  {diff[key] * 1e3:+7.3f}  {key[-100:]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (pairs per variant)")
    parser.add_argument("--warmup_steps", type=int, default=20, help="an untimed run of each variant first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every run")
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, plain is always added; from {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--step_blocks",
        type=int,
        default=0,
        help="instead of whole runs: this many interleaved rounds of short blocks of training steps",
    )
    parser.add_argument("--block", type=int, default=5, help="training steps per block (--step_blocks)")
    parser.add_argument(
        "--profile", type=int, default=0, help="instead: cProfile this many steps per variant, diff vs plain"
    )
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["plain"] + [name for name in args.variants.split(",") if name and name != "plain"]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if args.profile:
        profile_runs(names, args.profile)
        return
    if args.step_blocks:
        print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
        step_blocks(names, args.step_blocks, args.block)
        return
    print(
        f"quickstart recipe, {args.steps} steps per run, {args.rounds} rounds, "
        f"torch threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    tokens = {name: tokens_per_task(VARIANTS[name]) for name in names}
    for name in names:  # warm-up: first-run costs (allocator, lazy imports) out of the rounds
        timed_train(name, args.warmup_steps)

    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            seconds, cpu_seconds = timed_train(name, args.steps)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
        ratios = "  ".join(
            f"{name} {wall[name][-1] / wall['plain'][-1]:.3f}x (cpu {cpu[name][-1] / cpu['plain'][-1]:.3f}x)"
            for name in names
            if name != "plain"
        )
        print(
            f"round {round_index + 1}: plain {wall['plain'][-1]:.2f} s  {ratios}  "
            f"(load {os.getloadavg()[0]:.1f})",
            flush=True,
        )

    results: dict[str, object] = {
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "variants": {},
    }
    print(
        "\n| variant | ms/step (median) | wall-clock ratio: median | min–max | IQR "
        "| CPU-time ratio: median | min–max | tokens vs plain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        wall_stats = spread([run / plain for run, plain in zip(wall[name], wall["plain"], strict=True)])
        cpu_stats = spread([run / plain for run, plain in zip(cpu[name], cpu["plain"], strict=True)])
        token_ratio = tokens[name] / tokens["plain"]
        results["variants"][name] = {
            "wall_seconds": wall[name],
            "cpu_seconds": cpu[name],
            "wall_ratio": wall_stats,
            "cpu_ratio": cpu_stats,
            "tokens_per_task": tokens[name],
            "token_ratio": token_ratio,
        }
        print(
            f"| {name} | {statistics.median(wall[name]) / args.steps * 1e3:.1f} "
            f"| **{wall_stats['median']:.3f}×** | {wall_stats['min']:.3f}–{wall_stats['max']:.3f} "
            f"| {wall_stats['q1']:.3f}–{wall_stats['q3']:.3f} "
            f"| {cpu_stats['median']:.3f}× | {cpu_stats['min']:.3f}–{cpu_stats['max']:.3f} | {token_ratio:.2f}× |"
        )
    paper = results["variants"].get("paper")
    if paper:
        median = paper["wall_ratio"]["median"]
        verdict = "met" if median <= 1.10 else "NOT met"
        print(f"\npaper setting: median {median:.3f}x plain end to end (target <= 1.10x: {verdict})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
