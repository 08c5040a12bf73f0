"""The end-of-run summary of ``python -m icl_conml.train``: what was trained, how well, what next.

After the final save the main process evaluates the saved model and least squares on one fixed
small prompt set (``SUMMARY_PROMPTS`` prompts of seed ``SUMMARY_SEED``: the same for every run,
so two runs' summaries compare), and prints the error at k = d and 2d on the evaluation's scale
(squared error divided by the task's normaliser, ``FunctionClass.error``; 1 = predicting 0), the
output folder and the commands that come next. It is a quick look, not the evaluation:
``icl_conml eval`` uses more prompts and gives intervals. A failure here never fails the run.
"""

from __future__ import annotations

import logging
import math
import shlex
from pathlib import Path
from typing import Any

from .arguments import Recipe, plain_value
from .hub import push_repo_id
from .tasks import FunctionClass

logger = logging.getLogger("icl_conml")

SUMMARY_PROMPTS = 256
SUMMARY_SEED = 0
#: The reference printed next to the model.
REFERENCE = "least_squares"


def summary_errors(model_dir: str | Path, task_class: FunctionClass | None = None) -> dict[str, Any]:
    """The saved model's and least squares' error curves on the summary prompts (``evaluate_model``).

    The model is read back from ``model_dir`` (what the run wrote is what gets summarised); the
    run's own function class is passed in, so the reload builds no second one.
    """
    from .evaluation import EvaluationArguments, evaluate_model
    from .modeling import ICLModel

    args = EvaluationArguments(
        n_prompts=SUMMARY_PROMPTS, seed=SUMMARY_SEED, baselines=[REFERENCE], bootstrap_samples=1
    )
    from .lora import is_lora_checkpoint

    if is_lora_checkpoint(str(model_dir)):  # adapters: the evaluation merges them onto their backbone
        return evaluate_model(str(model_dir), args)
    model = ICLModel.from_pretrained(str(model_dir), task_class=task_class)
    return evaluate_model(model, args, model_id=str(model_dir))


def _number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return "< 0.001" if abs(value) < 5e-4 else f"{value:.3f}"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def format_summary(
    recipe: Recipe, metrics: dict[str, Any], results: dict[str, Any] | None, problem: str = ""
) -> str:
    """The summary's text; ``results`` from ``summary_errors`` (``None``: ``problem`` says why)."""
    training = recipe.training
    out = training.output_dir
    quoted = shlex.quote(str(out))
    runtime = metrics.get("train_runtime")
    took = f" in {_duration(float(runtime))}" if runtime is not None else ""
    lines = [f"finished {training.max_steps} steps{took}; the model is in {out}"]
    if results is not None:
        d = int(results["metadata"]["n_dims"])
        curves = results["curves"]
        lines.append(
            f"error (squared error / the task's normaliser, 1 = predicting 0) on {SUMMARY_PROMPTS} fixed "
            f"prompts (seed {SUMMARY_SEED}):"
        )
        width = len(f"k = 2d = {2 * d}")
        lines.append(f"  {'':<{width}}  {'model':>8}  {'least squares':>13}")
        for label, k in ((f"k = d = {d}", d), (f"k = 2d = {2 * d}", 2 * d)):
            model, reference = (
                curve[k] if k < len(curve) else None for curve in (curves["model"], curves[REFERENCE])
            )
            lines.append(f"  {label:<{width}}  {_number(model):>8}  {_number(reference):>13}")
    else:
        lines.append(f"(no error summary: {problem})")
    lines.append("next:")
    lines.append(f"  icl_conml eval --model {quoted} --output_dir {shlex.quote(str(Path(out) / 'eval'))}")
    if training.push_to_hub:
        lines.append(f"  (pushed to the Hub as {push_repo_id(training)})")
    else:
        lines.append(f"  icl_conml push {quoted} --hub_model_id YOUR_USER/NAME")
    if (Path(out) / "training_curves.png").is_file():
        lines.append(f"training curves: {Path(out) / 'training_curves.png'}")
    return "\n".join(lines)


def run_summary(recipe: Recipe, metrics: dict[str, Any]) -> str:
    """``format_summary`` of the run just saved in ``output_dir`` (evaluated here)."""
    try:
        results, problem = summary_errors(recipe.training.output_dir, recipe.function_class), ""
    except Exception as error:  # noqa: BLE001 - a summary must never fail a finished run
        results, problem = None, f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    return format_summary(recipe, metrics, results, problem)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters of ``model`` (a peft model counts its frozen backbone too)."""
    total = trainable = 0
    for parameter in model.parameters():
        count = parameter.ds_numel if hasattr(parameter, "ds_numel") else parameter.numel()  # ZeRO-3
        total += count
        trainable += count if parameter.requires_grad else 0
    return trainable, total


def run_header(recipe: Recipe, model) -> str:
    """The few lines logged before training (every key is in ``output_dir/recipe.yaml``)."""
    from . import __version__
    from .tracking import git_commit

    task, settings, training, spec = recipe.task, recipe.model, recipe.training, recipe.conml
    commit = git_commit().get("icl_conml_git_commit")
    version = f"icl_conml {__version__}" + (f", commit {commit[:7]}" if commit else "")
    lines = [f"resolved recipe: every key in {Path(training.output_dir) / 'recipe.yaml'} ({version})"]
    curriculum = []
    if task.curriculum_dims_start is not None:
        curriculum.append(f"d from {task.curriculum_dims_start}")
    if task.curriculum_points_start is not None:
        curriculum.append(f"points from {task.curriculum_points_start}")
    lines.append(
        f"  task {task.task}, d = {task.n_dims}, {task.n_points} points per prompt"
        + (f" (curriculum: {', '.join(curriculum)})" if curriculum else "")
    )
    trainable, total = parameter_counts(model)
    share = "all trainable" if trainable == total else f"{trainable:,} trainable ({trainable / total:.2%})"
    if settings.backbone_name_or_path:
        backbone = f"backbone {settings.backbone_name_or_path}" + (
            f" + LoRA r = {settings.lora_r}" if settings.lora_r > 0 else ""
        )
    else:
        backbone = f"GPT-2, {settings.n_layer} layers × {settings.n_embd} wide, {settings.n_head} heads"
    lines.append(f"  model {backbone}: {total:,} parameters, {share}")
    if spec.enabled:
        lines.append(
            f"  ConML λ = {spec.conml_lambda:g} (views {spec.conml_views} × {spec.conml_num_views}, distance "
            f"{spec.conml_distance}, loss {spec.conml_loss})"
        )
    else:
        lines.append("  plain ICL (conml_lambda = 0)")
    batch = recipe.global_batch_size
    schedule = plain_value(training.lr_scheduler_type)
    lines.append(
        f"  {training.max_steps} steps × {batch} prompts, learning rate {training.learning_rate:g} ({schedule}, "
        f"{_warmup(training.warmup_steps)}), seed {training.seed} → {training.output_dir}"
    )
    return "\n".join(lines)


def _warmup(steps: float) -> str:
    """``warmup_steps`` in words: below 1 it is a fraction of the run (TrainingArguments' rule)."""
    return f"{steps:.0%} warm-up" if 0 < steps < 1 else f"{steps:g} warm-up steps"
