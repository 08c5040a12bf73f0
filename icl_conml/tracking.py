"""Every recipe key in every tracker: what a run resolved to, recorded where its curves are.

``report_to`` backends (TensorBoard, W&B, MLflow, trackio, Comet, ...) record
``TrainingArguments.to_dict()`` as the run's config; the task, model and ConML sections are other
dataclasses and would be missing (a W&B sweep over ``conml_lambda`` could not tell its runs
apart). ``attach(recipe)`` stores the other sections, the package version and the git commit on
the training arguments, and ``ICLTrainingArguments.to_dict()`` returns them together with its own
fields, so every backend records them through the one call they all make. TensorBoard's
callback writes that dict only as text: ``TensorBoardHParams`` also writes it to the HParams
dashboard, so runs of a sweep can be sorted by λ next to their losses.
"""

from __future__ import annotations

import logging
import subprocess
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from . import __version__

if TYPE_CHECKING:
    from transformers import Trainer

    from .arguments import Recipe

logger = logging.getLogger("icl_conml")

#: Attribute of the training arguments that holds the extra settings (not a dataclass field, so
#: it is neither parsed from the command line nor part of ``dataclasses.asdict``).
ATTRIBUTE = "tracked_settings"
#: Scalars the HParams dashboard shows next to the settings (TensorBoard tags of the Trainer's logs).
HPARAM_METRICS = (
    "train/loss",
    "train/icl_loss",
    "train/conml_loss",
    "eval/loss",
    "eval/error_at_d",
    "eval/error_at_2d",
    "eval/needed_context_length",
)


@cache
def git_commit() -> dict[str, Any]:
    """``icl_conml_git_commit`` (and ``icl_conml_git_dirty``) of the checkout this package runs
    from; empty for an installed wheel, or when git is missing."""
    package = Path(__file__).resolve().parent
    try:
        top = _git(package, "rev-parse", "--show-toplevel")
        if Path(top).resolve() != package.parent:  # a venv inside some other repository
            return {}
        commit = _git(package, "rev-parse", "HEAD")
        dirty = bool(_git(package, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"icl_conml_git_commit": commit, "icl_conml_git_dirty": dirty}


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()


def tracked_settings(recipe: Recipe) -> dict[str, Any]:
    """Every resolved recipe key (``Recipe.to_dict()``), the package version and the git commit."""
    return {**recipe.to_dict(), "icl_conml_version": __version__, **git_commit()}


def attach(recipe: Recipe) -> None:
    """Make ``recipe.training.to_dict()`` (what every ``report_to`` backend records) carry every
    recipe key. Call it after ``recipe.yaml`` is written and before ``trainer.train()``."""
    training_keys = set(recipe.training.__dataclass_fields__)
    extra = {key: value for key, value in tracked_settings(recipe).items() if key not in training_keys}
    setattr(recipe.training, ATTRIBUTE, extra)


def hparams(settings: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """Values TensorBoard's HParams plugin accepts (None and lists as text)."""
    return {
        key: value if type(value) in (bool, int, float, str) else str(value)
        for key, value in settings.items()
    }


class TensorBoardHParams(TrainerCallback):
    """Write the run's settings to TensorBoard's HParams dashboard, in the event file the
    Trainer's ``TensorBoardCallback`` writes (it records them only as an ``args`` text)."""

    def __init__(self, tensorboard_callback: TrainerCallback) -> None:
        self.tensorboard = tensorboard_callback

    def on_train_begin(self, args, state, control, **kwargs):
        writer = getattr(self.tensorboard, "tb_writer", None)
        if not state.is_world_process_zero or writer is None or not hasattr(writer, "file_writer"):
            return  # tensorboardX writers have no file_writer: the args text still holds every key
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        settings = {**args.to_sanitized_dict(), **hparams(getattr(args, ATTRIBUTE, {}))}
        for summary in hparams_summaries(hparams(settings), dict.fromkeys(HPARAM_METRICS, 0.0)):
            writer.file_writer.add_summary(summary)
        writer.flush()


def add_callbacks(trainer: Trainer) -> None:
    """Add ``TensorBoardHParams`` after the Trainer's TensorBoard callback, when it reports there."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            trainer.add_callback(TensorBoardHParams(callback))
