"""The GPU check's parts: throughput rows, the SDPA kernel behind ConML's mask, a learning check, the report.

``benchmarks/gpu_check.sh`` runs them in turn, each writing JSON into one folder, then ``report``
writes ``docs/gpu.md``:

- ``run --row NAME=LAMBDA@PRECISION ...``: train each configuration for ``--steps`` steps (a fresh
  model and Trainer each; under ``torchrun`` / ``accelerate launch`` when the script launches
  it so): mean step time after warm-up, steps/s, tokens/s, samples/s, peak memory, model
  FLOP/s and its fraction of the device's peak for that precision.
- ``kernels``: one ConML training step (``ConMLTrainer.compute_loss`` + backward, exactly the
  training path) with and without ConML, fp32 and bf16 autocast: which SDPA kernel PyTorch picked
  (from the profiler's op names), then the step under ``torch.nn.attention.sdpa_kernel``
  restricted to each backend in turn: its time, or the error when that kernel cannot take the
  inputs (flash takes no arbitrary mask; math is the slow fallback to avoid).
- ``learn --seconds S``: the recipe's first curriculum stage held fixed, with ConML in bf16, for S
  seconds: the training loss must fall.
- ``report``: the markdown record.

Model FLOPs per step (forward + backward, the usual 6N rule plus attention):
``global batch × (6 · N · L + 12 · n_layer · n_embd · L²)`` with N the non-embedding
parameters (read-in, transformer blocks, read-out) and L the tokens per sequence: 2 per
(x, y) pair plus the ConML tokens appended to the main sequence.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import statistics
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
from icl_conml.recipe_parser import parse_recipe  # noqa: E402
from icl_conml.train import build_model, build_sampler, build_trainer  # noqa: E402
from icl_conml.trainer import ConMLTrainer  # noqa: E402

ROWS = (
    "fp32 plain", "fp32 conml", "bf16 plain", "bf16 conml",
    "ddp plain", "ddp conml", "zero2 plain", "zero2 conml", "bare fp32 plain", "bare bf16 plain",
)  # fmt: skip
# NVIDIA's H200 SXM spec sheet: dense bf16 tensor cores, and fp32 without TF32 (PyTorch's
# default for matmuls).
H200_PEAK_TFLOPS = {"bf16": 989.0, "fp32": 67.0}
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (device synchronised at both ends)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.times.append(time.perf_counter() - self._start)


class TimeLimit(TrainerCallback):
    """Stop training after ``seconds`` of wall time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = True
            control.should_log = True


def _recipe(args: argparse.Namespace, overrides: list[str], scratch: str, *extra: str):
    return parse_recipe(
        [
            args.recipe, *overrides, *extra, "--output_dir", scratch, "--save_strategy", "no",
            "--eval_strategy", "no", "--eval_n_prompts", "0", "--report_to", "none", "--disable_tqdm", "true",
        ]
    )  # fmt: skip


def tokens_per_sequence(recipe, sampler) -> int:
    """Main-sequence length at step 0, ConML's appended tokens included (2n + appended tokens)."""
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


def _launcher(trainer: ConMLTrainer) -> str:
    if trainer.is_deepspeed_enabled:
        stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
        return f"DeepSpeed ZeRO-{stage}"
    kind = str(getattr(trainer.accelerator.distributed_type, "value", trainer.accelerator.distributed_type))
    return {"NO": "single process", "MULTI_GPU": "DDP (NCCL)", "MULTI_CPU": "DDP (gloo)"}.get(kind, kind)


# ---- run ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Every ``--row NAME=LAMBDA@PRECISION`` in turn, each a fresh model and Trainer, one JSON file each."""
    for spec in args.row:
        name, _, rest = spec.partition("=")
        value, _, precision = rest.partition("@")
        precision = precision or "bf16"
        extra = ["--conml_lambda", value or "0", "--bf16", "true" if precision == "bf16" else "false"]
        row = measure(args, name, precision, [*overrides, *extra])
        if row is not None:
            Path(args.out_dir, name.replace(" ", "_") + ".row.json").write_text(json.dumps(row, indent=1))
            print(json.dumps(row))


def measure(args: argparse.Namespace, name: str, precision: str, overrides: list[str]) -> dict | None:
    """Train one configuration; its row on the main process, None on the others."""
    with tempfile.TemporaryDirectory() as scratch:
        recipe = _recipe(
            args, overrides, scratch, "--max_steps", str(args.steps), "--logging_steps", str(args.steps)
        )
        model = build_model(recipe)
        sampler = build_sampler(recipe)
        length = tokens_per_sequence(recipe, sampler)
        flops_per_step = sampler.global_batch_size * model_flops_per_sequence(
            model, recipe.model.n_layer, recipe.model.n_embd, length
        )
        timer = StepTimer()
        trainer = build_trainer(recipe, model=model, train_dataset=sampler, callbacks=[timer])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        peak_bytes, memory_kind = _peak_memory()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        if not trainer.is_world_process_zero():
            return None
        launcher = _launcher(trainer)
    return throughput_row(
        args, name=name, launcher=launcher, processes=recipe.training.world_size, precision=precision,
        global_batch=sampler.global_batch_size, length=length, conml_lambda=recipe.conml.conml_lambda,
        step_times=timer.times, flops_per_step=flops_per_step, peak_bytes=peak_bytes,
        memory_kind=memory_kind, final_loss=losses[-1] if losses else None,
    )  # fmt: skip


def _peak_memory() -> tuple[int, str]:
    """Peak memory so far and what it measures: the GPU allocator's peak, else the host's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "GPU, torch max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS of the process (no GPU)"


def throughput_row(
    args: argparse.Namespace,
    *,
    name: str,
    launcher: str,
    processes: int,
    precision: str,
    global_batch: int,
    length: int,
    conml_lambda: float,
    step_times: list[float],
    flops_per_step: float,
    peak_bytes: int,
    memory_kind: str,
    final_loss: float | None,
) -> dict:
    """One row of the report (the Trainer's stages and the bare loop alike): the mean step time
    after ``args.warmup`` steps and the rates, memory and FLOP/s that follow from it."""
    timed = step_times[args.warmup :] or step_times
    step_time = sum(timed) / len(timed)
    achieved = flops_per_step / step_time / 1e12
    peak = args.peak_tflops_bf16 if precision == "bf16" else args.peak_tflops_fp32
    return {
        "name": name,
        "launcher": launcher,
        "processes": processes,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "precision": precision,
        "global_batch": global_batch,
        "tokens_per_sequence": length,
        "conml_lambda": conml_lambda,
        "steps": args.steps,
        "timed_steps": len(timed),
        "step_time_s": step_time,
        "steps_per_s": 1.0 / step_time,
        "tokens_per_s": global_batch * length / step_time,
        "samples_per_s": global_batch / step_time,
        "peak_memory_gib": peak_bytes / 2**30,
        "memory_kind": memory_kind,
        "model_tflop_per_step": flops_per_step / 1e12,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "fraction_of_peak": achieved / peak,
        "final_loss": final_loss,
    }


# ---- kernels -----------------------------------------------------------------------------------------
def _sdpa_ops(step) -> list[str]:
    """The ``aten::_scaled_dot_product_*`` ops one call of ``step`` ran (the kernel SDPA picked)."""
    with torch.profiler.profile() as profile:
        step()
        _sync()
    names = {event.key for event in profile.key_averages()}
    return sorted(
        n
        for n in names
        if n.startswith("aten::_scaled_dot_product") or n == "aten::_efficient_attention_forward"
    )


def _training_step(trainer: ConMLTrainer, model, batch: dict, precision: str, device_type: str) -> None:
    """``compute_loss`` + backward, as the Trainer runs it (bf16: autocast)."""
    autocast = (
        torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    with autocast:
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)


def kernels(args: argparse.Namespace, overrides: list[str]) -> None:
    """Which SDPA kernel a training step runs, plain and with ConML's mask, fp32 and bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for conml_lambda in ("0", "0.02"):
        with tempfile.TemporaryDirectory() as scratch:
            recipe = _recipe(args, overrides, scratch, "--conml_lambda", conml_lambda, "--max_steps", "1")
            trainer = build_trainer(recipe)
            model = trainer.model.train()
            batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
            for precision in ("fp32", "bf16"):
                step = functools.partial(_training_step, trainer, model, batch, precision, device_type)
                step()  # warm-up (kernel selection, allocator)
                row = {
                    "inputs": "ConML (4D additive mask)"
                    if conml_lambda != "0"
                    else "plain (causal, no mask)",
                    "precision": precision,
                    "default": _sdpa_ops(step),
                    "backends": {},
                }
                for backend in BACKENDS:
                    try:
                        with sdpa_kernel([getattr(SDPBackend, backend)]):
                            step()
                            times = []
                            for _ in range(args.repeats):
                                _sync()
                                start = time.perf_counter()
                                step()
                                _sync()
                                times.append(time.perf_counter() - start)
                        row["backends"][backend] = {"ms": 1e3 * statistics.median(times)}
                    except Exception as error:  # noqa: BLE001 (a refusing backend: RuntimeError, or cuDNN's own)
                        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                        row["backends"][backend] = {"error": first.split(". ")[0][:100]}
                results.append(row)
                print(json.dumps(row))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    Path(args.out_dir, "kernels.json").write_text(json.dumps({"device": device, "rows": results}, indent=1))


# ---- learn -------------------------------------------------------------------------------------------
def learn(args: argparse.Namespace, overrides: list[str]) -> None:
    """Train for ``--seconds`` at the recipe's first curriculum stage (held fixed): does the loss fall?"""
    with tempfile.TemporaryDirectory() as scratch:
        recipe = _recipe(
            args, overrides, scratch, "--max_steps", "1000000", "--logging_steps", str(args.logging_steps),
            "--curriculum_dims_interval", "1000000000", "--curriculum_points_interval", "1000000000",
        )  # fmt: skip
        limit = TimeLimit(args.seconds)
        trainer = build_trainer(recipe, callbacks=[limit])
        trainer.train()
        seconds = time.perf_counter() - limit.start
        curve = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    first = [loss for _, loss in curve[:2]]
    last = [loss for _, loss in curve[-2:]]
    result = {
        "seconds": seconds,
        "steps": trainer.state.global_step,
        "n_dims": recipe.task.curriculum_dims_start or recipe.task.n_dims,
        "n_points": recipe.task.curriculum_points_start or recipe.task.n_points,
        "precision": "bf16" if recipe.training.bf16 else "fp32",
        "conml_lambda": recipe.conml.conml_lambda,
        "curve": curve,
        "first_loss": sum(first) / len(first) if first else None,
        "last_loss": sum(last) / len(last) if last else None,
    }
    result["falls"] = bool(first and last and result["last_loss"] < 0.5 * result["first_loss"])
    Path(args.out_dir, "learn.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({key: value for key, value in result.items() if key != "curve"}))


# ---- bare --------------------------------------------------------------------------------------------
def bare(args: argparse.Namespace, overrides: list[str]) -> None:
    """The same model, prompts, loss and optimizer in a bare PyTorch loop (no Trainer): its overhead.

    Plain ICL only (ConML's loss is the Trainer's ``compute_loss``); the optimizer is the one the
    recipe's Trainer builds (``optim``: fused AdamW when it says ``adamw_torch_fused``), with the
    recipe's learning rate and weight decay; bf16 is autocast, as the Trainer's ``--bf16 true``.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for precision in args.precision:
        with tempfile.TemporaryDirectory() as scratch:
            recipe = _recipe(
                args, [*overrides, "--conml_lambda", "0"], scratch, "--max_steps", str(args.steps)
            )
            model = build_model(recipe).to(device).train()
            sampler = build_sampler(recipe)
            length = tokens_per_sequence(recipe, sampler)
            flops_per_step = sampler.global_batch_size * model_flops_per_sequence(
                model, recipe.model.n_layer, recipe.model.n_embd, length
            )
            training = recipe.training
            fused = "fused" in str(getattr(training.optim, "value", training.optim)) and device.type == "cuda"
            optimizer = torch.optim.AdamW(
                model.parameters(),
                lr=training.learning_rate,
                betas=(training.adam_beta1, training.adam_beta2),
                eps=training.adam_epsilon,
                weight_decay=training.weight_decay,
                fused=fused or None,
            )
            autocast = (
                functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
                if precision == "bf16"
                else contextlib.nullcontext
            )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times, loss = [], None
            for step in range(args.steps):
                _sync()
                start = time.perf_counter()
                batch = sampler.global_batch(step)
                xs, ys = batch["xs"].to(device), batch["ys"].to(device)
                with autocast():
                    loss = model(xs=xs, ys=ys).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                _sync()
                times.append(time.perf_counter() - start)
            peak_bytes, memory_kind = _peak_memory()
        row = throughput_row(
            args, name=f"bare {precision} plain", launcher=f"bare PyTorch loop ({'fused ' if fused else ''}AdamW)",
            processes=1, precision=precision, global_batch=sampler.global_batch_size, length=length,
            conml_lambda=0.0, step_times=times, flops_per_step=flops_per_step, peak_bytes=peak_bytes,
            memory_kind=memory_kind, final_loss=float(loss) if loss is not None else None,
        )  # fmt: skip
        Path(args.out_dir, row["name"].replace(" ", "_") + ".row.json").write_text(json.dumps(row, indent=1))
        print(json.dumps(row))


# ---- rate --------------------------------------------------------------------------------------------
def rate(args: argparse.Namespace, overrides: list[str]) -> None:
    """``--jobs`` runs of a study spec at once (half each arm), as the study will run them: their step rates.

    Each run is a child process (``rate_one``) training the spec's recipe for ``--seconds``; the
    study's time per run is its start-up plus ``max_steps`` over the slowest rate measured here.
    """
    import subprocess

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.time()
    children = []
    for index in range(args.jobs):
        out = Path(args.out_dir, f"rate_{index}.json")
        command = [
            sys.executable, __file__, "rate_one", "--spec", args.spec, "--index", str(index),
            "--seconds", str(args.seconds), "--started", str(started), "--out", str(out), *overrides,
        ]  # fmt: skip
        children.append((out, subprocess.Popen(command, env=env)))
    runs = []
    for out, child in children:
        child.wait()
        if child.returncode == 0 and out.is_file():
            runs.append(json.loads(out.read_text()))
            out.unlink()
    if not runs:
        sys.exit("gpu_check: rate: no run finished (see the output above)")
    result = {
        "spec": args.spec,
        "processes": args.jobs,
        "finished": len(runs),
        "device": runs[0]["device"],
        "runs": runs,
        "slowest_steps_per_s": min(r["steps_per_s"] for r in runs),
        "aggregate_steps_per_s": sum(r["steps_per_s"] for r in runs),
        "startup_s": max(r["startup_s"] for r in runs),
    }
    for arm in sorted({r["arm"] for r in runs}):
        rates = [r["steps_per_s"] for r in runs if r["arm"] == arm]
        result[f"{arm}_steps_per_s"] = sum(rates) / len(rates)
    Path(args.out_dir, "rate.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


def rate_one(args: argparse.Namespace, overrides: list[str]) -> None:
    """One run of ``rate``: the spec's run ``--index`` (arms alternate) trained for ``--seconds``."""
    from icl_conml.experiment import load_spec

    spec = load_spec(args.spec)
    runs = spec.runs()
    run_ = runs[args.index % len(runs)]
    with tempfile.TemporaryDirectory() as scratch:
        train_args = [
            *run_.train_args(), *overrides, "--output_dir", scratch, "--save_strategy", "no",
            "--eval_strategy", "no", "--eval_n_prompts", "0", "--report_to", "none", "--disable_tqdm", "true",
        ]  # fmt: skip
        recipe = parse_recipe(train_args)
        limit = TimeLimit(args.seconds)
        trainer = build_trainer(recipe, callbacks=[limit])
        first_step, ends = [], []

        class Wall(TrainerCallback):
            """Wall time at each step's end: the rate with data, logging and evaluation included."""

            def on_step_begin(self, args, state, control, **kwargs):
                if not first_step:
                    first_step.append(time.time())

            def on_step_end(self, args, state, control, **kwargs):
                _sync()
                ends.append(time.perf_counter())

        trainer.add_callback(Wall())
        trainer.train()
    skip = min(len(ends) // 5, 20)  # warm-up: kernel selection, allocator
    if len(ends) - skip < 2:
        sys.exit(f"gpu_check: rate_one: only {len(ends)} steps in {args.seconds} s")
    result = {
        "arm": run_.arm,
        "seed": run_.seed,
        "conml_lambda": recipe.conml.conml_lambda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "steps": len(ends),
        "steps_per_s": (len(ends) - 1 - skip) / (ends[-1] - ends[skip]),
        "startup_s": (first_step[0] if first_step else time.time()) - args.started,
    }
    Path(args.out).write_text(json.dumps(result))


# ---- report ------------------------------------------------------------------------------------------
def _row_line(row: dict, rows: dict[str, dict]) -> str:
    group, _, kind = row["name"].rpartition(" ")
    base = rows.get(f"{group} plain") if kind == "conml" else None
    single = rows.get(f"bf16 {kind}") if group in ("ddp", "zero2") else None
    if group.startswith("bare "):
        single = rows.get(f"{row['precision']} plain")
    conml_ratio = f"{row['step_time_s'] / base['step_time_s']:.2f}x" if base else "-"
    vs_single = f"{row['step_time_s'] / single['step_time_s']:.2f}x" if single else "-"
    return (
        f"| {row['name']} | {row['launcher']} | {row['precision']} | {row['global_batch']} "
        f"| {row['tokens_per_sequence']} | {row['step_time_s'] * 1e3:.2f} | {row['steps_per_s']:.1f} "
        f"| {row['tokens_per_s']:,.0f} | {row['peak_memory_gib']:.3f} | {row['achieved_tflops']:.3g} "
        f"| {row['fraction_of_peak']:.2%} | {conml_ratio} | {vs_single} |"
    )


def report(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    rows = {
        row["name"]: row for row in (json.loads(p.read_text()) for p in sorted(folder.glob("*.row.json")))
    }
    ordered = [rows[name] for name in ROWS if name in rows] + [r for n, r in rows.items() if n not in ROWS]
    kernels_file, learn_file = folder / "kernels.json", folder / "learn.json"
    device = ordered[0]["device"] if ordered else "?"
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
        f"Written by `benchmarks/gpu_check.sh` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC in "
        f"{args.elapsed} s; torch {torch.__version__}, Python {platform.python_version()}. Device: {device}.",
        "",
        "## Throughput",
        "",
        f"The standard model of `{args.recipe}` at its final prompt size. Step time: mean over "
        f"{ordered[0]['timed_steps'] if ordered else '?'} of {ordered[0]['steps'] if ordered else '?'} steps "
        "(the first ones are warm-up), device synchronised around each step. bf16 is the Trainer's "
        "autocast (`--bf16 true`; DeepSpeed keeps bf16 weights). `ddp`: `torchrun` with one process "
        "(the model wrapped in DDP); `zero2`: `accelerate launch` with `recipes/accelerate/zero2.yaml`, "
        "one process.",
        "",
        "| run | launcher | precision | global batch | tokens/seq | step (ms) | steps/s | tokens/s "
        "| peak memory (GiB) | model TFLOP/s | of peak | ConML / plain | vs single process |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row_line(row, rows) for row in ordered]
    lines += [f"| {name} | not run |" + " |" * 11 for name in ROWS if name not in rows]
    if ordered:
        peaks = sorted({(row["precision"], row["peak_tflops"]) for row in ordered})
        lines += [
            "",
            f"Memory: {ordered[0]['memory_kind']}. Model FLOPs: global batch × (6·N·L + 12·n_layer·n_embd·L²), "
            "N = non-embedding parameters, L = tokens per sequence (ConML's appended tokens included); "
            "peaks used for the fraction: " + ", ".join(f"{p} {v:g} TFLOP/s" for p, v in peaks) + ".",
        ]
    overhead = [
        f"{precision}: {rows[f'{precision} plain']['step_time_s'] * 1e3:.2f} ms per step with the Trainer, "
        f"{rows[f'bare {precision} plain']['step_time_s'] * 1e3:.2f} ms in the bare loop "
        f"({rows[f'{precision} plain']['step_time_s'] / rows[f'bare {precision} plain']['step_time_s']:.2f}x)"
        for precision in ("fp32", "bf16")
        if f"{precision} plain" in rows and f"bare {precision} plain" in rows
    ]
    if overhead:
        lines += [
            "",
            "**The Trainer's overhead.** `bare`: the same model, prompts (`PromptSampler.global_batch`), "
            "loss and optimizer in a plain PyTorch loop (no Trainer, no callbacks, no logging), plain ICL, "
            'one process; its "vs single process" column is bare / Trainer. ' + "; ".join(overhead) + ".",
        ]
    rate_file = folder / "rate.json"
    if rate_file.is_file():
        found = json.loads(rate_file.read_text())
        arms = sorted(key.removesuffix("_steps_per_s") for key in found if key.endswith("_steps_per_s"))
        arms = [arm for arm in arms if arm not in ("slowest", "aggregate")]
        lines += [
            "",
            "## Step rate of the study's runs sharing the GPU",
            "",
            f"`{found['spec']}`'s runs (arms alternating), {found['processes']} training processes at once on the "
            f"one device, each for a fixed time ({found['finished']} finished): steps/s per run after warm-up "
            "(wall time, data and logging included; evaluation off), and the start-up until the first step.",
            "",
            "| arm | steps/s per run (mean) |",
            "|---|---|",
        ]
        lines += [f"| {arm} | {found[f'{arm}_steps_per_s']:.1f} |" for arm in arms]
        lines += [
            "",
            f"Slowest run {found['slowest_steps_per_s']:.1f} steps/s, all runs together "
            f"{found['aggregate_steps_per_s']:.1f} steps/s; start-up {found['startup_s']:.0f} s (the slowest).",
        ]
    lines += ["", "## Attention kernel with ConML's mask", ""]
    if kernels_file.is_file():
        found = json.loads(kernels_file.read_text())
        lines += [
            "One training step (`compute_loss` + backward) of the same model: the `aten` SDPA op PyTorch "
            "ran by default (profiler), then the step with `torch.nn.attention.sdpa_kernel` restricted to "
            "one backend (median ms, or why that backend refused the inputs).",
            "",
            "| inputs | precision | ran by default | " + " | ".join(BACKENDS) + " |",
            "|---|---|---|" + "---|" * len(BACKENDS),
        ]
        for row in found["rows"]:
            cells = []
            for backend in BACKENDS:
                result = row["backends"][backend]
                cells.append(f"{result['ms']:.2f} ms" if "ms" in result else f"no: {result['error']}")
            ran = ", ".join(f"`{op.removeprefix('aten::')}`" for op in row["default"]) or "?"
            lines.append(f"| {row['inputs']} | {row['precision']} | {ran} | " + " | ".join(cells) + " |")
    else:
        lines.append("Not run (see the script's output).")
    lines += ["", "## Learning check", ""]
    found = json.loads(learn_file.read_text()) if learn_file.is_file() else None
    if found is not None and not found["curve"]:
        lines.append(f"Trained {found['steps']} steps in {found['seconds']:.0f} s but logged no loss.")
    elif found is not None:
        verdict = "falls" if found["falls"] else "does NOT fall below half its start"
        curve = ", ".join(
            f"{step}: {loss:.3g}" for step, loss in found["curve"][:: max(1, len(found["curve"]) // 8)]
        )
        lines += [
            f"{found['seconds']:.0f} s of training ({found['steps']} steps) at the recipe's first curriculum "
            f"stage held fixed (d = {found['n_dims']}, {found['n_points']} points), {found['precision']}, "
            f"ConML λ = {found['conml_lambda']}: training loss {found['first_loss']:.3g} → "
            f"{found['last_loss']:.3g} (mean of the first and last two logs): the loss **{verdict}**.",
            "",
            f"Loss by step: {curve}.",
        ]
    else:
        lines.append("Not run (see the script's output).")
    if args.note:
        lines += ["", "## Not measured", ""] + [f"- {note}" for note in args.note]
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "Train configurations and write their rows (JSON)."),
        ("kernels", "Which SDPA kernel runs with and without ConML's mask (JSON)."),
        ("learn", "Train for --seconds: does the loss fall? (JSON)"),
        ("bare", "The same training in a bare PyTorch loop, no Trainer (JSON rows)."),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--recipe", default="recipes/linear_regression.yaml")
        sub.add_argument("--out_dir", required=True, help="Folder for the JSON files.")
        if name == "run":
            sub.add_argument(
                "--row", action="append", required=True, help="NAME=LAMBDA@PRECISION, repeatable."
            )
        if name == "bare":
            sub.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
        if name in ("run", "bare"):
            sub.add_argument("--steps", type=int, default=300)
            sub.add_argument("--warmup", type=int, default=50, help="Steps left out of the mean.")
            sub.add_argument("--peak_tflops_bf16", type=float, default=H200_PEAK_TFLOPS["bf16"])
            sub.add_argument("--peak_tflops_fp32", type=float, default=H200_PEAK_TFLOPS["fp32"])
        if name == "kernels":
            sub.add_argument("--repeats", type=int, default=5, help="Timed steps per backend.")
        if name == "learn":
            sub.add_argument("--seconds", type=float, default=120.0)
            sub.add_argument("--logging_steps", type=int, default=100)
    rate_parser = commands.add_parser("rate", help="Step rates of a study's runs sharing the device (JSON).")
    rate_parser.add_argument("--spec", default="recipes/experiments/lr_paper_gpu_20k.yaml")
    rate_parser.add_argument("--jobs", type=int, default=8, help="Runs at once (arms alternate).")
    rate_parser.add_argument("--seconds", type=float, default=30.0, help="Training time of each run.")
    rate_parser.add_argument("--out_dir", required=True)
    one = commands.add_parser("rate_one", help="One run of `rate` (internal).")
    one.add_argument("--spec", required=True)
    one.add_argument("--index", type=int, required=True)
    one.add_argument("--seconds", type=float, required=True)
    one.add_argument("--started", type=float, required=True, help="time.time() when the runs were launched")
    one.add_argument("--out", required=True)
    report_parser = commands.add_parser("report", help="Write the markdown record of a folder of results.")
    report_parser.add_argument("folder")
    report_parser.add_argument("--report", default="docs/gpu.md")
    report_parser.add_argument("--recipe", default="recipes/linear_regression.yaml")
    report_parser.add_argument("--elapsed", default="?", help="Seconds the whole check took.")
    report_parser.add_argument("--dry_run", action="store_true")
    report_parser.add_argument("--note", action="append", default=[], help="A stage not measured, and why.")
    args, overrides = parser.parse_known_args(argv)
    if args.command == "report":
        if overrides:
            parser.error(f"unknown arguments: {' '.join(overrides)}")
        report(args)
    else:
        commands_ = {
            "run": run,
            "kernels": kernels,
            "learn": learn,
            "bare": bare,
            "rate": rate,
            "rate_one": rate_one,
        }
        commands_[args.command](args, overrides)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        # As in icl_conml.train: skip the teardown that sometimes aborts a finished multi-process run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
