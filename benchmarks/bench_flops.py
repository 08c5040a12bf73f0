"""Achieved FLOP/s of the standard model, as a fraction of this machine's fp32 matmul FLOP/s.

Garg et al.'s standard model (``recipes/linear_regression.yaml`` at its final curriculum size:
d = 20, 41 points, GPT-2 256/12/8, sdpa attention): a training step (forward, backward,
gradient clipping, AdamW) with ConML off and with the paper's ConML, and an evaluation forward
(256 prompts, as ``icl_conml.evaluation`` batches them, under ``torch.inference_mode``). The
reference is ``torch.mm`` of two large fp32 squares measured in the same run with the same
thread count. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix
multiplies and attention, forward and backward: the work a GPU would count as model FLOPs);
the time is the whole step, so the fraction says how much of the step the machine spends at
matmul speed. A ``torch.profiler`` breakdown of the step's CPU time into matrix-multiply
kernels and everything else says where the rest goes. Every round times each row once and the
matmul reference again, in alternating order, and the medians are compared: the load of a
shared machine drifts. Times are by the wall clock and by this process's CPU time (the steadier
of the two on a loaded machine; equal to the wall clock on an idle one with one thread).
``--compare_activations`` adds rows with GPT-2's activation as ``transformers`` computes it
(``NewGELUActivation``, the same floats as ours) and as the fused ``gelu(approximate="tanh")``
(faster, but it rounds differently).

    python benchmarks/bench_flops.py [--threads 1] [--rounds 3] [--matmul_size 2048] [--compare_activations]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from icl_conml.recipe_parser import parse_recipe  # noqa: E402
from icl_conml.train import build_trainer  # noqa: E402
from icl_conml.trainer import ConMLTrainer  # noqa: E402

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "linear_regression.yaml")
# The final curriculum stage from the first step: d = 20, 41 points.
FINAL_SIZE = ["--curriculum_dims_start", "20", "--curriculum_points_start", "41", "--eval_strategy", "no"]
# Kernels that do the counted FLOPs (matrix multiplies, and sdpa's fused attention).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product")


def matmul_flops_per_second(size: int, repeats: int = 3) -> tuple[float, float]:
    """Best-of-``repeats`` fp32 FLOP/s of ``torch.mm`` on two (size, size) matrices: by the wall
    clock and by this process's CPU time."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    times = [_clock(lambda: torch.mm(a, b)) for _ in range(repeats)]
    return 2 * size**3 / min(wall for wall, _ in times), 2 * size**3 / min(cpu for _, cpu in times)


def _clock(function) -> tuple[float, float]:
    """(wall-clock, CPU) seconds of one call."""
    start, start_cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - start, time.process_time() - start_cpu


def set_activation(model: torch.nn.Module, kind: str) -> None:
    """GPT-2's MLP activation: ``exact`` (ours, the default), ``composite`` (transformers'
    ``NewGELUActivation``, the same floats), ``fused`` (``GELUTanh``, i.e. gelu_pytorch_tanh:
    rounds differently)."""
    from transformers.activations import GELUTanh, NewGELUActivation

    from icl_conml.gelu import ExactNewGELU

    for block in model.backbone.h:
        block.mlp.act = {"exact": ExactNewGELU, "composite": NewGELUActivation, "fused": GELUTanh}[kind]()


def make_trainer(extra: list[str], output_dir: str) -> ConMLTrainer:
    recipe = parse_recipe(
        [
            RECIPE,
            *FINAL_SIZE,
            *extra,
            "--output_dir",
            output_dir,
            "--report_to",
            "none",
            "--max_steps",
            "1000",
        ]
    )
    trainer = build_trainer(recipe)
    trainer.model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def training_step(trainer: ConMLTrainer, step: int) -> None:
    """What the Trainer does for one optimizer step: sample, forward + backward, clip, AdamW."""
    batch = trainer.train_dataset.micro_batch(step, 0, 1)
    trainer.training_step(trainer.model, batch)
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad()


def counted_flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def time_breakdown(function) -> dict[str, float]:
    """Self CPU seconds of one call, split into matrix-multiply kernels and the rest."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        function()
    split: dict[str, float] = defaultdict(float)
    others: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        if event.key.startswith(MATMUL_OPS):
            split["matmul"] += seconds
        else:
            split["other"] += seconds
            others[event.key] += seconds
    top = sorted(others.items(), key=lambda item: -item[1])[:6]
    return {**split, "top_other": top}


ACTIVATIONS = {
    "composite": "transformers' NewGELUActivation (before)",
    "fused": "fused gelu_pytorch_tanh (not bit-identical)",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for everything")
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed rounds: one of each measurement per round"
    )
    parser.add_argument("--eval_batch", type=int, default=256, help="prompts per evaluation forward")
    parser.add_argument("--matmul_size", type=int, default=2048)
    parser.add_argument(
        "--compare_activations",
        action="store_true",
        help="also time the plain step and the evaluation forward with transformers' gelu_new "
        "and with the fused gelu",
    )
    parser.add_argument(
        "--only",
        choices=("all", "train", "eval"),
        default="all",
        help="eval: the evaluation forward alone, in a process that has not trained (as the evaluation "
        "CLI runs it; a process that trained first runs the forward faster)",
    )
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"standard model (d=20, 41 points, GPT-2 256/12/8, sdpa), torch threads {torch.get_num_threads()}, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, load average {os.getloadavg()[0]:.1f}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        trainers = {"plain": make_trainer(["--conml_lambda", "0"], tmp), "ConML": make_trainer([], tmp)}
    step_counter = iter(range(10**6))
    model = trainers["ConML"].model
    batch = trainers["ConML"].train_dataset.micro_batch(0, 0, 1)
    copies = -(-args.eval_batch // batch["xs"].shape[0])
    xs = batch["xs"].repeat(copies, 1, 1)[: args.eval_batch]
    ys = batch["ys"].repeat(copies, 1)[: args.eval_batch]

    def step(trainer: ConMLTrainer) -> None:
        training_step(trainer, next(step_counter))

    def evaluation_forward() -> None:
        model.eval()
        with torch.inference_mode():
            model(xs=xs, ys=ys)
        model.train()

    # name -> (function, activation model, activation kind, counted FLOPs key)
    eval_name = f"evaluation forward ({args.eval_batch} prompts)"
    measured = {
        "training step, plain": (lambda: step(trainers["plain"]), trainers["plain"].model, "exact"),
        "training step, ConML": (lambda: step(trainers["ConML"]), model, "exact"),
        eval_name: (evaluation_forward, model, "exact"),
    }
    if args.compare_activations:
        for kind, label in ACTIVATIONS.items():
            measured[f"training step, plain, {label}"] = measured["training step, plain"][:2] + (kind,)
            measured[f"{eval_name}, {label}"] = (evaluation_forward, model, kind)
    if args.only != "all":
        keep = eval_name if args.only == "eval" else "training step"
        measured = {name: row for name, row in measured.items() if name.startswith(keep)}

    flops, breakdowns = {}, {}
    for name, (function, _, kind) in measured.items():
        if kind == "exact":  # the same FLOPs under every activation
            function()  # warm-up
            flops[name] = counted_flops(function)
            breakdowns[name] = time_breakdown(function)
    for name, (_, _, kind) in measured.items():
        if name not in flops:  # an activation variant: the FLOPs of its row with ours
            flops[name] = flops[name.removesuffix(f", {ACTIVATIONS[kind]}")]

    peaks: list[tuple[float, float]] = []
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in measured}
    for round_index in range(args.rounds):  # interleaved: the load drifts, every row sees it alike
        peaks.append(matmul_flops_per_second(args.matmul_size, repeats=2))
        names = list(measured) if round_index % 2 == 0 else list(measured)[::-1]
        for name in names:
            function, activation_model, kind = measured[name]
            set_activation(activation_model, kind)
            times[name].append(_clock(function))
            set_activation(activation_model, "exact")
    peak_wall = statistics.median(wall for wall, _ in peaks)
    peak_cpu = statistics.median(cpu for _, cpu in peaks)
    print(
        f"torch.mm {args.matmul_size}^2 fp32 (median of {args.rounds} rounds): {peak_wall / 1e9:.1f} GFLOP/s by "
        f"the wall clock, {peak_cpu / 1e9:.1f} GFLOP/s by CPU time"
    )
    results: dict[str, object] = {
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "matmul_flops_per_second": {"wall": peak_wall, "cpu": peak_cpu, "rounds": peaks},
    }

    print(
        "\n| measured | model GFLOP | s (wall) | GFLOP/s (wall) | fraction of torch.mm (wall) "
        "| s (CPU) | fraction of torch.mm (CPU) | CPU time in matmul kernels |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in measured:
        wall = statistics.median(seconds for seconds, _ in times[name])
        cpu = statistics.median(seconds for _, seconds in times[name])
        breakdown = breakdowns.get(name)
        share = breakdown["matmul"] / (breakdown["matmul"] + breakdown["other"]) if breakdown else None
        print(
            f"| {name} | {flops[name] / 1e9:.1f} | {wall:.2f} | {flops[name] / wall / 1e9:.1f} | "
            f"**{flops[name] / wall / peak_wall:.1%}** | {cpu:.2f} | **{flops[name] / cpu / peak_cpu:.1%}** | "
            f"{'' if share is None else f'{share:.0%}'} |"
        )
        results[name] = {
            "flops": flops[name],
            "seconds": times[name],
            "fraction_of_matmul": {
                "wall": flops[name] / wall / peak_wall,
                "cpu": flops[name] / cpu / peak_cpu,
            },
            "matmul_time_share": share,
            "top_other_ops": breakdown["top_other"] if breakdown else None,
        }
    for name, breakdown in breakdowns.items():
        shown = ", ".join(f"{key} {seconds:.2f} s" for key, seconds in breakdown["top_other"])
        print(f"{name}: outside matmul kernels: {shown}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
