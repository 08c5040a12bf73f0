"""Measure one training configuration (``run``) and write the GPU check's table (``report``).

``benchmarks/gpu_check.sh`` calls ``run`` once per row (single process, or under
``accelerate launch`` for ZeRO-2), then ``report``. A row is: mean step time after warm-up,
samples/s, peak memory, model FLOP/s and its fraction of the device's bf16 peak.

Model FLOPs per step (forward + backward, the usual 6N rule plus attention):
``global batch × (6 · N · L + 12 · n_layer · n_embd · L²)`` with N the non-embedding
parameters (read-in, transformer blocks, read-out) and L the tokens per sequence: 2 per
(x, y) pair plus the ConML probe tokens appended to the main sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

# Before anything imports DeepSpeed (the Trainer does): its accelerator must match the machine.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

from transformers import TrainerCallback  # noqa: E402

from icl_conml import conml  # noqa: E402
from icl_conml.config import parse_recipe  # noqa: E402
from icl_conml.train import build_model, build_sampler  # noqa: E402
from icl_conml.trainer import ConMLTrainer  # noqa: E402

ROWS = ("plain", "conml", "zero2 plain", "zero2 conml")
H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's H200 SXM spec sheet, dense (no sparsity)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (device synchronised at both ends)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def tokens_per_sequence(recipe, sampler) -> int:
    """Main-sequence length at step 0, ConML probe tokens included (2n + appended tokens)."""
    batch = sampler.global_batch(0)
    n_points = batch["xs"].shape[1]
    if "probes" not in batch:
        return 2 * n_points
    settings = recipe.conml
    layout = conml.build_layout(
        batch["xs"][:1],
        batch["ys"][:1],
        batch["probes"][:1],
        batch["view_index"][:1],
        settings.conml_views,
        settings.conml_prefix_mode,
    )
    return 2 * n_points + layout.tokens.shape[1]


def model_flops_per_sequence(model, n_layer: int, n_embd: int, length: int) -> float:
    embeddings = sum(
        module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Embedding)
    )
    non_embedding = sum(p.numel() for p in model.parameters()) - embeddings
    return 6.0 * non_embedding * length + 12.0 * n_layer * n_embd * length**2


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Every ``--row NAME=LAMBDA`` in turn, each a fresh model and Trainer, one JSON file each."""
    for spec in args.row:
        name, _, value = spec.partition("=")
        row = measure(args, name, [*overrides, "--conml_lambda", value or "0"])
        if row is not None:
            Path(args.out_dir, name.replace(" ", "_") + ".json").write_text(json.dumps(row, indent=1))
            print(json.dumps(row))


def measure(args: argparse.Namespace, name: str, overrides: list[str]) -> dict | None:
    """Train one configuration; its row on the main process, None on the others."""
    with tempfile.TemporaryDirectory() as scratch:
        recipe = parse_recipe(
            [
                args.recipe,
                *overrides,
                "--max_steps",
                str(args.steps),
                "--output_dir",
                scratch,
                "--save_strategy",
                "no",
                "--eval_strategy",
                "no",
                "--eval_n_prompts",
                "0",
                "--logging_steps",
                str(args.steps),
                "--report_to",
                "none",
                "--disable_tqdm",
                "true",
            ]  # fmt: skip
        )
        model = build_model(recipe)
        sampler = build_sampler(recipe)
        length = tokens_per_sequence(recipe, sampler)
        flops_per_step = sampler.global_batch_size * model_flops_per_sequence(
            model, recipe.model.n_layer, recipe.model.n_embd, length
        )
        timer = StepTimer()
        trainer = ConMLTrainer(
            model=model,
            args=recipe.training,
            train_dataset=sampler,
            conml_args=recipe.conml,
            callbacks=[timer],
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        if torch.cuda.is_available():
            peak_bytes, memory_kind = torch.cuda.max_memory_allocated(), "GPU, torch max_memory_allocated"
        else:
            peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            memory_kind = "host peak RSS of the process (no GPU)"
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        if not trainer.is_world_process_zero():
            return None
    timed = timer.times[args.warmup :] or timer.times
    step_time = sum(timed) / len(timed)
    achieved = flops_per_step / step_time / 1e12
    return {
        "name": name,
        "processes": recipe.training.world_size,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "precision": "bf16" if recipe.training.bf16 else "fp32",
        "global_batch": sampler.global_batch_size,
        "tokens_per_sequence": length,
        "conml_lambda": recipe.conml.conml_lambda,
        "steps": args.steps,
        "timed_steps": len(timed),
        "step_time_s": step_time,
        "samples_per_s": sampler.global_batch_size / step_time,
        "peak_memory_gib": peak_bytes / 2**30,
        "memory_kind": memory_kind,
        "model_tflop_per_step": flops_per_step / 1e12,
        "achieved_tflops": achieved,
        "fraction_of_peak": achieved / args.peak_tflops,
        "peak_tflops": args.peak_tflops,
        "final_loss": losses[-1] if losses else None,
    }


def report(args: argparse.Namespace) -> None:
    rows = [json.loads(Path(path).read_text()) for path in args.rows if Path(path).is_file()]
    order = {name: i for i, name in enumerate(ROWS)}
    rows.sort(key=lambda row: order.get(row["name"], len(order)))
    missing = [name for name in ROWS if name not in {row["name"] for row in rows}]
    plain = {row["name"]: row for row in rows}
    lines = []
    if args.dry_run:
        lines += [
            "DRY RUN on CPU: a tiny model for a few steps, to check the script end to end.",
            "These are not GPU measurements.",
            "",
        ]
    lines += [
        "# GPU check",
        "",
        f"Written by `benchmarks/gpu_check.sh` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
        f"torch {torch.__version__}, Python {platform.python_version()}.",
        f"Device: {rows[0]['device'] if rows else '?'}. Peak used for the fraction: "
        f"{rows[0]['peak_tflops'] if rows else '?'} TFLOP/s (bf16 dense).",
        "",
        "| run | processes | precision | global batch | tokens/seq | step time (ms) | samples/s "
        "| peak memory (GiB) | model TFLOP/s | fraction of peak | vs plain step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = plain.get("zero2 plain" if row["name"].startswith("zero2") else "plain")
        ratio = f"{row['step_time_s'] / base['step_time_s']:.2f}x" if base else "-"
        lines.append(
            f"| {row['name']} | {row['processes']} | {row['precision']} | {row['global_batch']} "
            f"| {row['tokens_per_sequence']} | {row['step_time_s'] * 1e3:.2f} | {row['samples_per_s']:.0f} "
            f"| {row['peak_memory_gib']:.3f} | {row['achieved_tflops']:.3g} | {row['fraction_of_peak']:.2%} "
            f"| {ratio} |"
        )
    for name in missing:
        lines.append(f"| {name} | not run: {args.missing} |" + " |" * 9)
    if rows:
        lines += [
            "",
            f"Step time: mean over {rows[0]['timed_steps']} of {rows[0]['steps']} steps (the first ones are "
            "warm-up), device synchronised around each step. Memory: "
            f"{rows[0]['memory_kind']}. Model FLOPs: global batch × (6·N·L + 12·n_layer·n_embd·L²), "
            "N = non-embedding parameters, L = tokens per sequence (ConML probe tokens included).",
        ]
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="Train one configuration and write its row (JSON).")
    run_parser.add_argument("--row", action="append", required=True, help="NAME=CONML_LAMBDA, repeatable.")
    run_parser.add_argument("--recipe", default="recipes/linear_regression.yaml")
    run_parser.add_argument("--steps", type=int, default=300)
    run_parser.add_argument("--warmup", type=int, default=50, help="Steps left out of the mean.")
    run_parser.add_argument("--peak_tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    run_parser.add_argument("--out_dir", required=True, help="Folder for the rows' JSON files.")
    report_parser = commands.add_parser("report", help="Write the markdown table of the rows.")
    report_parser.add_argument("--report", default="docs/gpu.md")
    report_parser.add_argument("--dry_run", action="store_true")
    report_parser.add_argument(
        "--missing", default="failed (see the script's output)", help="Why a row has no measurement."
    )
    report_parser.add_argument("rows", nargs="*", help="The rows' JSON files.")
    args, overrides = parser.parse_known_args(argv)
    if args.command == "run":
        run(args, overrides)
    else:
        if overrides:
            parser.error(f"unknown arguments: {' '.join(overrides)}")
        report(args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        # As in icl_conml.train: skip the teardown that sometimes aborts a finished multi-process run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
