"""What an evaluation is asked to do: argument dataclasses (parsed by ``HfArgumentParser`` in
``cli.py``, built directly in Python) and the one-line user error every module raises."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import OOD_KINDS
from ..errors import UserError


class EvaluationError(UserError, ValueError):
    """A user error (bad model id, eval set, option): reported as one line by the CLI (exit 2)."""


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class CommonArguments:
    """Which prompts, and how they are run: shared by the evaluation of one model and ``compare``.
    Task, dimension and length default to the (first) model's saved config."""

    _argument_group_name = "prompts and run"

    task: str | None = _help("Function class (default: the model's).", default=None)
    task_kwargs: dict[str, Any] | str | None = _help(
        "JSON, e.g. '{\"noise_std\": 0.5}' (default: the model's).", default=None
    )
    n_dims: int | None = _help("Input dimension (default: the model's).", default=None)
    n_points: int | None = _help("Pairs per prompt (default: n_positions).", default=None)
    n_prompts: int = _help("Prompts to evaluate on.", default=1280)
    seed: int = _help("Seed of the prompts and of the bootstrap.", default=0)
    ood: str | None = _help(f"Distribution shift: {', '.join(OOD_KINDS)} (NAME or NAME=VALUE).", default=None)
    eval_set: str | None = _help("A fixed eval set: a folder or a Hub dataset REPO[:CONFIG].", default=None)
    batch_size: int = _help("Prompts per forward pass.", default=256)
    bootstrap_samples: int = _help("Bootstrap resamples.", default=1000)
    device: str = _help(
        "Device of the model (the CLI's default is auto: cuda when available, else cpu).", default="cpu"
    )
    dtype: Literal["float32", "bfloat16"] = _help("Model forward precision (autocast).", default="float32")
    allow_unfinished: bool = _help(
        "Evaluate a training output_dir whose run_status.json says the run has not finished (running, "
        "interrupted, failed): its final files may be missing or an earlier run's.",
        default=False,
    )
    trust_remote_code: bool = _help(
        "Import a task that a model's config.json or an eval set names by import path (module:Class): "
        "runs code that came with those files, so only for files you trust.",
        default=False,
    )


@dataclass
class EvaluationArguments(CommonArguments):
    """The evaluation of one model against the reference estimators (``curves.evaluate_model``)."""

    _argument_group_name = "evaluation"

    threshold: float = _help("Absolute error threshold ε.", default=0.1)
    relative_tolerance: float = _help("'Within X of the best reference' (0.1 = 10%%).", default=0.1)
    baselines: list[str] | None = _help(
        "Reference estimators (name or name:key=value), default per task; none: --baselines with no value.",
        default=None,
    )


@dataclass
class CompareArguments(CommonArguments):
    """The paper's Table 5 for models A_i against B_i (``compare.compare_models``)."""

    _argument_group_name = "comparison"

    labels: list[str] = _help(
        "Names of the two sets of models in tables and plots.", default_factory=lambda: ["A", "B"]
    )


def check_arguments(args: CommonArguments) -> None:
    """Every number is one the evaluation can use (``EvaluationError``, one line, before any model
    is loaded or prompt drawn): sizes >= 1, a seed >= 0, thresholds finite and >= 0."""
    for key in ("n_dims", "n_points"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise EvaluationError(f"--{key} {value} must be >= 1 (or left out: the model's)")
    for key in ("n_prompts", "batch_size", "bootstrap_samples"):
        if getattr(args, key) < 1:
            raise EvaluationError(f"--{key} {getattr(args, key)} must be >= 1")
    if args.seed < 0:
        raise EvaluationError(f"--seed {args.seed} must be >= 0")
    for key in ("threshold", "relative_tolerance"):
        value = getattr(args, key, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise EvaluationError(f"--{key} {value} must be a finite number >= 0")


# ---- the command line only: which models, where the results go ------------------------------------------
@dataclass
class EvaluatedModel:
    """The model of ``python -m icl_conml.evaluation``."""

    _argument_group_name = "model"

    model: str = _help("A training output_dir or a Hub id.")


@dataclass
class ComparedModels:
    """The two sets of models of ``python -m icl_conml.evaluation compare``, paired by position."""

    _argument_group_name = "models"

    models: list[str] = _help("Models A (e.g. ConML runs, one per seed).")
    against: list[str] = _help("Models B (e.g. plain ICL runs, same seeds).")


@dataclass
class OutputArguments:
    """Where and how the command line reports."""

    _argument_group_name = "output"

    output_dir: str = _help("Where results are written.")
    log_scale: bool = _help("Logarithmic error axis in the plot.", default=False)
    quiet: bool = _help("No progress bars (they are shown only when stderr is a terminal).", default=False)
