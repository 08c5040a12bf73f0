"""When a quickstart variant leaves the loss plateau, seed by seed, from the start of its own schedule.

The quickstart's error at k = 2d is decided largely by when a run leaves the loss plateau (the
training error stays at ~1, "predict 0", until the model starts to use its context), and that
differs by seed. This trains ``recipes/quickstart.yaml`` plus FLAGS exactly as ``train`` builds it
(``build_trainer``), with the variant's own ``max_steps`` and learning-rate schedule, stops at
``--stop`` and prints, for each seed, the first logged step whose training ``icl_error`` is below
``--threshold`` and the training ``icl_error`` every 500 steps. No evaluation, no checkpoints.

    OMP_NUM_THREADS=1 python benchmarks/bench_plateau_escape.py --seeds 42 1 2 3 --stop 2000
    OMP_NUM_THREADS=1 python benchmarks/bench_plateau_escape.py -- --curriculum_dims_start 2 ...

Under a curriculum the early prompts have fewer active dimensions and points, so ``icl_error``
(``icl_loss`` over the full task's normaliser) reads lower until the curriculum ends.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import PrinterCallback, TrainerCallback  # noqa: E402

from icl_conml.callbacks import NormalisedTrainingError  # noqa: E402
from icl_conml.recipe_parser import parse_recipe  # noqa: E402
from icl_conml.train import build_trainer  # noqa: E402

QUICKSTART = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")


class StopAt(TrainerCallback):
    """Stops training at ``stop`` steps and keeps the logged ``icl_error`` by step."""

    def __init__(self, stop: int) -> None:
        self.stop = stop
        self.errors: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "icl_error" in logs:
            self.errors[state.global_step] = float(logs["icl_error"])
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.stop:
            control.should_training_stop = True
        return control


def training_errors(flags: list[str], seed: int, stop: int) -> dict[int, float]:
    """The training ``icl_error`` by logged step of quickstart + ``flags`` at ``seed``, up to ``stop``."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe = parse_recipe(
            [QUICKSTART, *flags, "--seed", str(seed), "--output_dir", tmp, "--save_strategy", "no"]
            + ["--disable_tqdm", "true", "--report_to", "none", "--eval_n_prompts", "0"]
        )
        trainer = build_trainer(recipe)
        trainer.remove_callback(PrinterCallback)  # the raw log dicts; the summary line says it all
        NormalisedTrainingError.add_to(trainer, recipe.function_class)
        clock = StopAt(stop)
        trainer.add_callback(clock)
        trainer.train()
    return clock.errors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3])
    parser.add_argument("--stop", type=int, default=2000, help="steps to train (of the variant's schedule)")
    parser.add_argument(
        "--threshold", type=float, default=0.8, help="icl_error that counts as off the plateau"
    )
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="-- then recipe flags for the variant")
    args = parser.parse_args()
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    print(f"quickstart {' '.join(flags) or '(as it is)'}, first {args.stop} steps")
    for seed in args.seeds:
        errors = training_errors(flags, seed, args.stop)
        left = next((step for step in sorted(errors) if errors[step] < args.threshold), None)
        every_500 = " ".join(f"{step}: {errors[step]:.3f}" for step in sorted(errors) if step % 500 == 0)
        print(
            f"seed {seed}: icl_error < {args.threshold} from step {left or 'never'}; {every_500}", flush=True
        )


if __name__ == "__main__":
    sys.exit(main())
