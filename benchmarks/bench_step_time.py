"""Step time and activation memory: ConMLTrainer vs a bare PyTorch loop, and each ConML variant vs plain.

Two measurements, each against a reference timed in the same run:

1. Trainer overhead: ``ConMLTrainer.train()`` (ConML off) against a bare PyTorch loop doing
   the same work on the same model, data, optimizer and schedule (forward, backward, gradient
   clipping, AdamW, scheduler). Blocks of steps alternate between the two, several rounds, and
   the median block time per step is compared.
2. ConML overhead: the trainer's own ``training_step`` + optimizer step for plain ICL and every
   ConML variant, interleaved round-robin (so background load hits all variants alike).
   Memory is the bytes autograd saves for backward in one step (the activation memory, which
   is what ConML adds; the weights and optimizer state are the same for all variants).

    python benchmarks/bench_step_time.py [--recipe quickstart|standard] [--rounds 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from icl_conml.recipe_parser import parse_recipe  # noqa: E402
from icl_conml.train import build_trainer  # noqa: E402
from icl_conml.trainer import ConMLTrainer  # noqa: E402

RECIPES = {
    # the quickstart: d = 5, 11 points, 64/4/4 GPT-2
    "quickstart": [],
    # Garg et al.'s standard model at its final curriculum size: d = 20, 41 points, 256/12/8
    "standard": ["--n_dims", "20", "--n_points", "41", "--n_embd", "256", "--n_layer", "12", "--n_head", "8"],
}
VARIANTS: dict[str, list[str]] = {
    "plain": ["--conml_lambda", "0"],
    "default (paper)": [],
    "prefix_half as extra_sequence": ["--conml_prefix_mode", "extra_sequence"],
    "probe_hidden": ["--conml_representation", "probe_hidden"],
    "num_probes=4": ["--conml_num_probes", "4"],
    "num_views=4": ["--conml_num_views", "4"],
    "random_subset": ["--conml_views", "random_subset"],
    "shuffle": ["--conml_views", "shuffle"],
    "shuffled_subset": ["--conml_views", "shuffled_subset"],
    "eager attention, plain": ["--conml_lambda", "0", "--attn_implementation", "eager"],
    "eager attention, default": ["--attn_implementation", "eager"],
}


def make_trainer(recipe_args: list[str], output_dir: str) -> tuple[ConMLTrainer, object]:
    args = [*recipe_args, "--output_dir", output_dir, "--eval_n_prompts", "0", "--report_to", "none"]
    args += ["--disable_tqdm", "true", "--logging_steps", "1000000", "--save_strategy", "no"]
    recipe = parse_recipe(args)
    trainer = build_trainer(recipe)
    return trainer, recipe


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def trainer_block(recipe_args: list[str], steps: int) -> float:
    """Seconds per step of ConMLTrainer.train() (ConML off), excluding its first step."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = make_trainer([*recipe_args, "--conml_lambda", "0", "--max_steps", str(steps + 1)], tmp)
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
    return (clock.times[-1] - clock.times[0]) / steps


def bare_block(recipe_args: list[str], steps: int) -> float:
    """Seconds per step of a plain PyTorch loop doing the same work as the Trainer."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer, recipe = make_trainer(
            [*recipe_args, "--conml_lambda", "0", "--max_steps", str(steps + 1)], tmp
        )
    model, sampler, args = trainer.model, trainer.train_dataset, recipe.training
    model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=steps + 1)  # the Trainer's own optimizer
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    times = []
    for step in range(steps + 1):
        batch = sampler.micro_batch(step, 0, 1)
        loss = model(xs=batch["xs"], ys=batch["ys"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        times.append(time.perf_counter())
    return (times[-1] - times[0]) / steps


def saved_activation_bytes(trainer: ConMLTrainer, batch: dict) -> int:
    """Bytes of tensors autograd keeps for backward during one training forward."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.compute_loss(trainer.model, batch).backward()
    trainer.model.zero_grad()
    return total


def conml_variants(recipe_args: list[str], rounds: int, steps: int) -> dict[str, dict[str, float]]:
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS.items():
            trainer, _ = make_trainer(
                [*recipe_args, *extra, "--max_steps", "100000"], f"{tmp}/{len(trainers)}"
            )
            trainer.model.train()
            trainer.create_optimizer_and_scheduler(num_training_steps=100000)
            trainer.current_gradient_accumulation_steps = 1
            trainers[name] = trainer
    samples: dict[str, list[float]] = {name: [] for name in trainers}
    tokens: dict[str, int] = {}
    memory: dict[str, int] = {}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for step in range(steps):
                batch = trainer.train_dataset.micro_batch(round_index * steps + step, 0, 1)
                trainer.training_step(trainer.model, batch)
                trainer.optimizer.step()
                trainer.optimizer.zero_grad()
            if round_index:
                samples[name].append((time.perf_counter() - start) / steps)
            elif name not in memory:
                memory[name] = saved_activation_bytes(trainer, batch)
                tokens[name] = count_tokens(trainer, batch)
    plain = statistics.median(samples["plain"])
    plain_eager = statistics.median(samples["eager attention, plain"])
    results = {}
    for name, values in samples.items():
        reference = plain_eager if name.startswith("eager") else plain
        ref_name = "eager attention, plain" if name.startswith("eager") else "plain"
        results[name] = {
            "seconds_per_step": statistics.median(values),
            "time_ratio": statistics.median(values) / reference,
            "token_ratio": tokens[name] / tokens[ref_name],
            # The targets: <= 1.10x for the paper's default; extra tokens cost what they cost.
            "target_ratio": 1.10
            if name.endswith("default (paper)") or name.endswith("default")
            else 1.1 * tokens[name] / tokens[ref_name],
            "activation_memory_ratio": memory[name] / memory[ref_name],
        }
    return results


def count_tokens(trainer: ConMLTrainer, batch: dict) -> int:
    """Tokens per sequence the backbone sees for this variant (context + appended)."""
    from icl_conml import conml

    context = 2 * batch["xs"].shape[1]
    if not (trainer.conml_args.enabled and "probes" in batch):
        return context
    settings = trainer.conml_args
    layout = conml.build_layout(
        batch["xs"],
        batch["ys"],
        batch["probes"],
        batch["view_index"],
        settings.conml_views,
        settings.conml_prefix_mode,
    )
    return context + layout.tokens.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="quickstart")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--skip_trainer_overhead", action="store_true")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    recipe_args = RECIPES[args.recipe]
    print(
        f"recipe={args.recipe} threads={torch.get_num_threads()} rounds={args.rounds} steps/block={args.steps}"
    )
    results: dict[str, object] = {"recipe": args.recipe, "threads": torch.get_num_threads()}

    if not args.skip_trainer_overhead:
        trainer_times, bare_times = [], []
        bare_block(recipe_args, 3)  # warm-up
        for _ in range(args.rounds):
            bare_times.append(bare_block(recipe_args, args.steps))
            trainer_times.append(trainer_block(recipe_args, args.steps))
        ratio = statistics.median(trainer_times) / statistics.median(bare_times)
        results["trainer_overhead"] = {
            "bare_seconds_per_step": statistics.median(bare_times),
            "trainer_seconds_per_step": statistics.median(trainer_times),
            "ratio": ratio,
        }
        print(f"\nTrainer vs bare PyTorch loop (ConML off): {ratio:.3f}x  (target <= 1.05x)")
        print(
            f"  bare {statistics.median(bare_times) * 1e3:.1f} ms/step, trainer {statistics.median(trainer_times) * 1e3:.1f} ms/step"
        )

    variants = conml_variants(recipe_args, args.rounds, args.steps)
    results["conml"] = variants
    print("\n| variant | ms/step | time vs plain | target | tokens vs plain | activation memory vs plain |")
    print("|---|---|---|---|---|---|")
    for name, row in variants.items():
        print(
            f"| {name} | {row['seconds_per_step'] * 1e3:.1f} | {row['time_ratio']:.3f}x | <= {row['target_ratio']:.2f}x "
            f"| {row['token_ratio']:.2f}x | {row['activation_memory_ratio']:.3f}x |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
