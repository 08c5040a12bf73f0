"""Where a run starts: a fresh output_dir, or the checkpoint it resumes, checked before anything is built.

- ``resolve_resume``: the checkpoint ``resume_from_checkpoint`` names (a ``checkpoint-N``
  folder, ``latest``, or ``auto`` for requeues), each one checked (``checkpoints.check_checkpoint``)
  and its model compared with the recipe's;
- ``prepare_output_dir``: without a resume, never train over an earlier run unless
  ``overwrite_output_dir`` (which deletes its checkpoints);
- ``check_resume``: an honest resume, compared with the settings the run recorded
  (``run_history.jsonl``): a change that alters the experiment is refused in one line, a safe
  one is allowed and recorded;
- after the model is built, ``check_checkpoint_weights``; ``weights_only`` (a fresh optimizer,
  the schedule moved to the step) and ``nothing_trained`` (a resume already at max_steps).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import arguments
from ..arguments import Recipe, RecipeError
from . import RunError
from .checkpoints import (
    AUTO,
    LATEST,
    NO_RESUME,
    check_checkpoint,
    checkpoints_newest_first,
    damaged_checkpoints,
    incomplete_checkpoints,
    latest_checkpoint,
    previous_run,
    remove_checkpoints,
    remove_final_files,
)
from .files import refuse_links
from .record import HISTORY_NAME, read_history, recorded_metrics

logger = logging.getLogger("icl_conml")


# ---- which checkpoint, and is it whole ------------------------------------------------------------
WEIGHTS_ONLY_HINT = (
    "pass --resume_weights_only true to restart from its weights with a fresh optimizer (the schedule "
    "continues at its step)"
)


def resolve_resume(recipe: Recipe) -> str | None:
    """The checkpoint ``resume_from_checkpoint`` names: a ``checkpoint-N`` folder, or ``latest``
    (also ``true``/``last``) for the newest intact checkpoint in ``output_dir``.

    Every checkpoint is checked (``checkpoints.check_checkpoint``: manifest, structure, optimizer
    and scheduler state): ``latest`` skips a damaged one with a warning, an explicit folder that
    fails is refused in one line.
    """
    training = recipe.training
    value = training.resume_from_checkpoint
    if value is None or str(value) in NO_RESUME:
        if training.resume_weights_only:
            raise RecipeError(
                "resume_weights_only=true needs --resume_from_checkpoint (latest or a checkpoint-N folder)"
            )
        return None
    need_state = not training.resume_weights_only
    if str(value) in AUTO:  # requeue scripts: continue the run if it saved a checkpoint, else start it
        if not checkpoints_newest_first(training.output_dir):
            logger.info(
                "resume_from_checkpoint=auto: %s holds no checkpoint; starting the run", training.output_dir
            )
            return None
        incomplete = incomplete_checkpoints(training.output_dir)
        if incomplete is not None:  # killed during its first saves: nothing to resume, as if empty
            logger.warning(
                "resume_from_checkpoint=auto: every checkpoint in %s was cut short before it was complete "
                "(%s); starting the run from step 0 and removing them",
                training.output_dir,
                "; ".join(incomplete[:3]) + ("; ..." if len(incomplete) > 3 else ""),
            )
            return None
        value = "latest"
    if str(value) in LATEST:
        last = latest_checkpoint(training.output_dir, need_training_state=need_state)
        if last is None:
            damaged = damaged_checkpoints(training.output_dir, need_training_state=need_state)
            if damaged:
                shown = "; ".join(damaged[:3]) + ("; ..." if len(damaged) > 3 else "")
                missing_state = all("optimizer/schedule state" in line for line in damaged)
                fix = WEIGHTS_ONLY_HINT if missing_state else "start a new run (another output_dir)"
                if incomplete_checkpoints(training.output_dir) is not None:
                    fix = "pass --resume_from_checkpoint auto to start the run from step 0 (nothing was saved whole)"
                raise RunError(
                    f"resume_from_checkpoint={value!r} but no checkpoint in output_dir={training.output_dir!r} "
                    f"is intact ({shown}); {fix}"
                )
            raise RunError(
                f"resume_from_checkpoint={value!r} but output_dir={training.output_dir!r} holds no complete "
                f"checkpoint; point output_dir at the run to resume, or drop the flag to start a new run"
            )
        checkpoint = last
    else:
        checkpoint = str(value)
        problem = check_checkpoint(checkpoint, need_training_state=need_state)
        if problem is not None:
            if "optimizer/schedule state" in problem:
                fix = WEIGHTS_ONLY_HINT
            elif problem == "is not a directory":
                fix = "pass a complete checkpoint-N folder of an earlier run, or 'latest' for the newest one"
            else:
                fix = "resume from an earlier checkpoint-N, or 'latest' (which skips damaged checkpoints)"
            raise RunError(f"resume_from_checkpoint={checkpoint!r} {_phrase(problem)}; {fix}")
    _check_resumable(recipe, checkpoint)
    return checkpoint


def _phrase(problem: str) -> str:
    """``check_checkpoint``'s reason as the end of "resume_from_checkpoint=X ..."."""
    return problem if problem.startswith(("is ", "holds ")) else f"fails its integrity check: {problem}"


def _check_resumable(recipe: Recipe, checkpoint: str) -> None:
    """The checkpoint's model must be the one the recipe builds (else loading fails mid-way)."""
    config_file = Path(checkpoint) / "config.json"
    if not config_file.is_file():
        return  # a LoRA checkpoint saves adapter_config.json: peft checks it on load
    import json

    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError):
        raise RunError(
            f"resume_from_checkpoint={checkpoint!r} fails its integrity check: config.json is unreadable; "
            f"resume from an earlier checkpoint-N, or 'latest'"
        ) from None
    task, model = recipe.task, recipe.model
    expected = {"task": task.task, "n_dims": task.n_dims, "n_positions": recipe.n_positions}
    if not model.backbone_name_or_path:
        expected.update(
            n_embd=model.n_embd,
            n_layer=model.n_layer,
            n_head=model.n_head,
            activation_function=model.activation_function,  # checked where the run saved it
        )
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            raise RecipeError(
                f"resume_from_checkpoint={checkpoint!r} was trained with {key}={saved[key]!r} but the recipe "
                f"says {key}={value!r}; resume with the run's own recipe "
                f"({Path(recipe.training.output_dir) / 'recipe.yaml'})"
            )


# ---- a fresh start -------------------------------------------------------------------------------
def make_output_dir(output_dir: str) -> None:
    """Create ``output_dir`` (and its parents), or refuse in one line naming it."""
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(
            f"output_dir={output_dir!r} cannot be created ({error.strerror}); pick a writable folder"
        ) from None


def prepare_output_dir(recipe: Recipe, resume: str | None) -> None:
    """Refuse to train over an earlier run unless the user resumes it or asks to overwrite it.

    With ``overwrite_output_dir`` the earlier run's ``checkpoint-N`` folders are deleted, so
    that a later ``--resume_from_checkpoint latest`` can never pick up a checkpoint of it.
    """
    training = recipe.training
    output_dir = training.output_dir
    make_output_dir(output_dir)
    refuse_links(output_dir)  # the Trainer writes without O_NOFOLLOW: no link where a run writes
    main = training.process_index == 0
    if resume is None and str(training.resume_from_checkpoint) in AUTO:
        incomplete = incomplete_checkpoints(output_dir)
        if incomplete is not None and main:
            remove_checkpoints(output_dir, [line.split(":", 1)[0] for line in incomplete])
    found = previous_run(output_dir) if resume is None else []
    if found and not training.overwrite_output_dir:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunError(
            f"output_dir={output_dir!r} already holds a run ({shown}); pass --resume_from_checkpoint latest "
            f"to continue it, --overwrite_output_dir true to start over, or choose another output_dir"
        )
    if resume is None and training.overwrite_output_dir and main:
        # The old final model goes first: a new run cut short must not leave it beside its recipe.
        removed = remove_final_files(output_dir) + remove_checkpoints(output_dir)
        if removed:
            logger.warning("overwrite_output_dir: removed %s from %s", ", ".join(removed), output_dir)


# ---- an honest resume: the run's own settings ----------------------------------------------------
#: Schedules that do not depend on max_steps: a longer (or shorter) run keeps its learning rates.
STEADY_SCHEDULES = ("constant", "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau")


def _is_experiment_key(key: str) -> bool:
    # A key's role (arguments.KeyRole) says whether a resume may change it; max_steps has its own rule.
    role = arguments.key_role(key)
    return key != "max_steps" and role is not None and not role.resumable


def recorded_settings(checkpoint: str | Path) -> tuple[dict[str, Any], str]:
    """The settings of the run a checkpoint belongs to (its newest segment), and where they come from.

    The run's ``run_history.jsonl`` records every key and the global batch; a run from before it
    existed has only ``recipe.yaml`` (in the checkpoint, or next to it): the keys it holds are
    compared, the others cannot be.
    """
    run_dir = Path(checkpoint).parent
    for entry in reversed(read_history(run_dir)):
        if entry.get("event") == "start" and isinstance(entry.get("settings"), dict):
            settings = dict(entry["settings"])
            if "global_batch_size" in entry:
                settings["global_batch_size"] = entry["global_batch_size"]
            return settings, str(run_dir / HISTORY_NAME)
    import yaml

    for path in (Path(checkpoint) / "recipe.yaml", run_dir / "recipe.yaml"):
        try:
            saved = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(saved, dict):
            return saved, str(path)
    return {}, ""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(recipe, checkpoint: str, start_step: int, global_batch_size: int) -> dict[str, list[Any]]:
    """Compare a resume with the run it continues; returns the allowed changes (key: [old, new]).

    Refused in one line (``RecipeError``): a change of any key that alters the experiment
    (a key whose ``arguments.KeyRole`` is not resumable: what is trained, and the global batch);
    ``max_steps`` below the checkpoint's step; another ``max_steps`` under a decaying schedule
    unless ``resume_extend_schedule`` (it re-plans the schedule). Everything else (logging,
    saving, evaluation, reporting, a longer run under a steady schedule) is allowed, and the
    caller records it in the run history.
    """
    training = recipe.training
    settings = {**recipe.to_dict(), "global_batch_size": global_batch_size}
    if start_step > training.max_steps:
        raise RecipeError(
            f"max_steps={training.max_steps} is below the step of {checkpoint} ({start_step}): that run is already "
            f"past it; resume with max_steps >= {start_step}, or start a new run in another output_dir"
        )
    recorded, source = recorded_settings(checkpoint)
    if not recorded:
        logger.warning(
            "%s: no record of the run's settings; the resume cannot be compared with them", checkpoint
        )
        return {}
    changes = {
        key: [recorded[key], settings[key]]
        for key in settings
        if key in recorded and not _same(recorded[key], settings[key])
    }
    allowed = set(training.resume_allow_changes or ())
    refused = [key for key in changes if _is_experiment_key(key) and key not in allowed]
    if "global_batch_size" not in changes:
        # Another split of the same global batch (another number of processes, per-device size or
        # accumulation) trains on the same prompts; with ConML the tasks contrasted with each other
        # are those of one micro-batch over all processes, so its accumulation must stay.
        split = {"per_device_train_batch_size"}
        if not _conml_on(recorded, settings):
            split.add("gradient_accumulation_steps")
        refused = [key for key in refused if key not in split]
    if refused:
        shown = ", ".join(f"{key} {_show(changes[key][0])} -> {_show(changes[key][1])}" for key in refused)
        raise RecipeError(
            f"resuming {checkpoint} would change the experiment ({shown}; recorded in {source}); "
            f"{_batch_hint(recorded, settings, training) if 'global_batch_size' in refused else ''}resume with "
            f"the run's own settings (python -m icl_conml.train {Path(training.output_dir) / 'recipe.yaml'} "
            f"--resume_from_checkpoint latest), change {'it' if len(refused) == 1 else 'them'} on purpose with "
            f"--resume_allow_changes {' '.join(refused)} (recorded in {HISTORY_NAME}), or start a new run in "
            f"another output_dir"
        )
    for key in sorted(allowed - set(changes)):
        logger.warning("resume_allow_changes names %s, which does not change: nothing to allow", key)
    if "max_steps" in changes:
        schedule = str(settings["lr_scheduler_type"])
        if schedule not in STEADY_SCHEDULES and not training.resume_extend_schedule:
            old, new = changes["max_steps"]
            jump = _lr_jump(training, old, new, start_step)
            raise RecipeError(
                f"max_steps {old} -> {new} re-plans the {schedule} learning-rate schedule from step {start_step}"
                f"{jump}; pass --resume_extend_schedule true to accept that, keep max_steps={old}, or use a "
                f"constant schedule"
            )
    for key, (old, new) in changes.items():
        logger.warning(
            "resume: %s changes from %s to %s (recorded in %s)", key, _show(old), _show(new), HISTORY_NAME
        )
    return changes


def _conml_on(*settings: dict[str, Any]) -> bool:
    return any(float(entry.get("conml_lambda") or 0) > 0 for entry in settings)


def _batch_hint(recorded: dict[str, Any], settings: dict[str, Any], training) -> str:
    """How to keep the run's global batch on this launch (e.g. another number of processes)."""
    total = int(recorded["global_batch_size"])
    accumulation = int(settings["gradient_accumulation_steps"])
    processes = training.world_size
    if _conml_on(recorded, settings):
        accumulation = int(recorded.get("gradient_accumulation_steps") or accumulation)
    if total % (processes * accumulation):
        return (
            f"the run's global batch of {total} prompts (per_device_train_batch_size x processes x "
            f"gradient_accumulation_steps) cannot be split over {processes} process(es); "
        )
    keep = f"--per_device_train_batch_size {total // (processes * accumulation)}"
    if accumulation != int(settings["gradient_accumulation_steps"]):
        keep += f" --gradient_accumulation_steps {accumulation}"
    return f"to keep the run's global batch of {total} prompts on {processes} process(es), pass {keep}; "


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _lr_jump(training, old_steps: int, new_steps: int, step: int) -> str:
    """`` (the learning rate goes from A to B)`` at ``step``, or empty if it cannot be computed."""
    try:
        from transformers import get_scheduler

        rates = []
        for total in (old_steps, new_steps):
            optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=training.learning_rate)
            scheduler = get_scheduler(
                training.lr_scheduler_type,
                optimizer,
                num_warmup_steps=training.get_warmup_steps(total),
                num_training_steps=total,
                scheduler_specific_kwargs=training.lr_scheduler_kwargs or {},
            )
            rates.append(
                [
                    training.learning_rate * scheduler.lr_lambdas[0](s)
                    for s in range(step, min(old_steps, new_steps) + 1)
                ]
            )
    except Exception:  # noqa: BLE001 - only a detail of the message
        return ""
    # During warm-up both plans give the same rate at this step: name the first step where they part.
    for offset, (old_rate, new_rate) in enumerate(zip(*rates, strict=True)):
        if f"{old_rate:.3g}" != f"{new_rate:.3g}":
            at = "" if offset == 0 else f" at step {step + offset}"
            return f" (the learning rate{at} goes from {old_rate:.3g} to {new_rate:.3g})"
    return ""


# ---- after the model is built --------------------------------------------------------------------
def check_checkpoint_weights(checkpoint: str, model: torch.nn.Module) -> None:
    """The checkpoint's weight file holds exactly the model's tensors (the Trainer would keep
    freshly initialised layers for missing keys, with only a log line)."""
    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file() or hasattr(model, "peft_config"):
        return  # a LoRA checkpoint holds adapters only: peft checks them when loading
    from safetensors import safe_open

    with safe_open(str(path), "pt") as weights:
        saved = set(weights.keys())
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} of the model's {len(expected)} tensors ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''})")  # fmt: skip
        if unexpected:
            parts.append(f"holds {len(unexpected)} unknown tensors ({', '.join(unexpected[:3])})")
        raise RecipeError(
            f"resume_from_checkpoint={checkpoint!r}: model.safetensors {' and '.join(parts)}; it is not a "
            f"checkpoint of this model: resume from another checkpoint, or with the run's own recipe "
            f"({Path(checkpoint).parent / 'recipe.yaml'})"
        )


def weights_only(trainer_class: type) -> type:
    """``trainer_class`` resuming only the weights: a fresh optimizer, the schedule moved to the step."""

    class WeightsOnlyResume(trainer_class):
        def _load_optimizer_and_scheduler(self, checkpoint):
            logger.warning(
                "resume_weights_only: starting a fresh optimizer at step %s (Adam moments reset); the "
                "learning-rate schedule continues at that step",
                self.state.global_step,
            )
            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose
                warnings.simplefilter("ignore")
                for _ in range(self.state.global_step):
                    self.lr_scheduler.step()

        def _load_rng_state(self, checkpoint):
            return None

    return WeightsOnlyResume


def nothing_trained(trainer, metrics: dict[str, float], resume: str) -> None:
    """Resuming a checkpoint at max_steps trains no step: the Trainer then reports train_loss=0.0.
    Keep the train_loss the run recorded when it trained those steps (or none at all)."""
    recorded = recorded_metrics(trainer.args.output_dir, trainer.state.global_step).get("train_loss")
    logger.info("%s is at max_steps=%s: nothing left to train; writing the final model", resume,
                trainer.args.max_steps)  # fmt: skip
    last = trainer.state.log_history[-1] if trainer.state.log_history else {}
    for logged in (metrics, last):
        if "train_loss" in logged:
            if recorded is None:
                del logged["train_loss"]
            else:
                logged["train_loss"] = recorded
