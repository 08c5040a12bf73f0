"""Train an in-context learner: ``python -m icl_conml.train [RECIPE.yaml] [--key value ...]``.

The same command runs under ``accelerate launch`` on one CPU, one GPU or many processes.
Without a recipe it runs the built-in quickstart (a CPU-sized linear-regression run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from transformers import TrainingArguments, set_seed

from . import extras, tracking
from .arguments import Recipe, RecipeError
from .checkpoints import (
    AUTO,
    LATEST,
    NO_RESUME,
    CheckpointManifest,
    check_checkpoint,
    checkpoint_step,
    checkpoints_newest_first,
    damaged_checkpoints,
    latest_checkpoint,
    previous_run,
    remove_checkpoints,
)
from .data import ConMLSampling, Curriculum, Prompts, PromptSampler, Schedule
from .errors import run_main
from .hub import push_errors_explained
from .modeling import ICLConfig, ICLModel
from .recipe_checks import validate
from .recipe_parser import parse_recipe
from .run_guard import (
    EXIT_CTRL_C,
    EXIT_INTERRUPTED,
    RunGuard,
    RunInterrupted,
    check_resume,
    storage_error,
)
from .tasks import task_reference

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger("icl_conml")


@contextlib.contextmanager
def _whole_weights(training: TrainingArguments) -> Iterator[None]:
    """Build the model whole on every process, also under DeepSpeed ZeRO-3.

    Once the training arguments exist, a ZeRO-3 launch has registered its DeepSpeed config
    with transformers, which then builds models inside ``deepspeed.zero.Init``: partitioned at
    construction and re-initialised in another random order, so the initial weights would
    depend on the launch. Our models are small: built as one process builds them, a ZeRO-3 run
    starts from the same weights as any other run, and DeepSpeed shards them when the Trainer
    prepares the model.
    """
    from transformers.integrations import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    plugin = getattr(training, "deepspeed_plugin", None)
    registered = getattr(training, "hf_deepspeed_config", None) or getattr(plugin, "dschf", None)
    if registered is None or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(registered)


def build_model(recipe: Recipe) -> ICLModel | PeftModel:
    """A freshly initialised model for the recipe (seeded by ``seed``), the same on any launch.

    With ``backbone_name_or_path`` the backbone is that pretrained model; with ``lora_r > 0``
    the result is a ``peft.PeftModel`` training LoRA adapters and read-in/read-out only.
    """
    with _whole_weights(recipe.training):
        return _build_model(recipe)


def _build_model(recipe: Recipe) -> ICLModel | PeftModel:
    task, model = recipe.task, recipe.model
    if model.backbone_name_or_path or model.lora_r > 0 or model.freeze_backbone:
        from .lora import build_lora_model

        set_seed(recipe.training.seed)
        return build_lora_model(recipe)
    config = ICLConfig(
        n_dims=task.n_dims,
        n_positions=model.n_positions or task.n_points,
        n_embd=model.n_embd,
        n_layer=model.n_layer,
        n_head=model.n_head,
        dropout=model.dropout,
        task=task_reference(task.function_class()),
        task_kwargs=task.hyperparameters(),
    )
    config.backbone_config._attn_implementation = model.attn_implementation
    set_seed(recipe.training.seed)
    return ICLModel(config)


def build_curriculum(recipe: Recipe) -> Curriculum:
    task = recipe.task
    dims = Schedule(task.n_dims, task.n_dims, 0, 0)
    points = Schedule(task.n_points, task.n_points, 0, 0)
    if task.curriculum_dims_start is not None:
        dims = Schedule(
            task.curriculum_dims_start, task.n_dims, task.curriculum_dims_inc, task.curriculum_dims_interval
        )
    if task.curriculum_points_start is not None:
        points = Schedule(
            task.curriculum_points_start,
            task.n_points,
            task.curriculum_points_inc,
            task.curriculum_points_interval,
        )
    return Curriculum(dims, points)


def build_sampler(recipe: Recipe) -> PromptSampler:
    """Training prompts: the global batch of step t is a function of (data_seed or seed, t)."""
    task_args, training, settings = recipe.task, recipe.training, recipe.conml
    sampling = None
    if settings.enabled:
        sampling = ConMLSampling(
            num_probes=settings.conml_num_probes,
            views=settings.conml_views,
            num_views=settings.conml_num_views,
            subset_min=settings.conml_subset_min,
            subset_max=settings.conml_subset_max,
        )
    global_batch = (
        training.per_device_train_batch_size * training.world_size * training.gradient_accumulation_steps
    )
    return PromptSampler(
        task=task_args.function_class(),
        curriculum=build_curriculum(recipe),
        global_batch_size=global_batch,
        seed=training.data_seed if training.data_seed is not None else training.seed,
        task_pool_size=task_args.task_pool_size,
        conml_sampling=sampling,
    )


def build_eval_prompts(recipe: Recipe) -> Prompts | None:
    """The fixed prompts evaluated during training: ``eval_set`` if given, else ``eval_n_prompts``
    prompts drawn from ``eval_seed`` (not the training seed: every run of a study sees the same)."""
    task_args = recipe.task
    if task_args.eval_set is not None:
        return load_training_eval_set(recipe)
    if task_args.eval_n_prompts == 0:
        return None
    task = task_args.function_class()
    return Prompts.sample(task, task_args.eval_n_prompts, task_args.n_points, seed=task_args.eval_seed)


def load_training_eval_set(recipe: Recipe) -> Prompts:
    """``eval_set`` as training-time eval prompts, checked against the recipe's task and sizes."""
    from .evaluation.arguments import EvaluationError
    from .evaluation.loading import load_eval_set

    task_args, name = recipe.task, recipe.task.eval_set
    try:
        prompts, metadata = load_eval_set(name)
    except EvaluationError as error:
        raise RecipeError(f"eval_set: {error}") from None
    expected = {"task": task_args.task, "n_dims": task_args.n_dims}
    for key, value in expected.items():
        if metadata[key] != value:
            raise RecipeError(
                f"eval_set={name!r} holds {key}={metadata[key]!r} prompts but the recipe trains {key}={value!r}; "
                f"make an eval set for this recipe (data_scripts/make_eval_sets.py) or drop eval_set"
            )
    limit = recipe.model.n_positions or task_args.n_points
    if metadata["n_points"] > limit or prompts.queries is not None:
        raise RecipeError(
            f"eval_set={name!r} has prompts of {metadata['n_points']} points"
            f"{' with shifted queries' if prompts.queries is not None else ''}; training-time evaluation "
            f"needs plain prompts of at most {limit} points (use the evaluation CLI for shifted sets)"
        )
    return Prompts(prompts.xs, prompts.ys)  # training-time evaluation: plain errors, no error_scale


def build_compute_metrics(recipe: Recipe):
    """The Trainer's ``compute_metrics``: the error at every k (``error_at_k/K``), the error at
    k = d and 2d and the needed context length at error 0.1, logged at every evaluation."""
    from .evaluation.statistics import curve_metrics

    task_args = recipe.task
    if task_args.eval_n_prompts == 0 and task_args.eval_set is None:
        return None
    return curve_metrics(task_args.function_class())


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
        value = "latest"
    if str(value) in LATEST:
        last = latest_checkpoint(training.output_dir, need_training_state=need_state)
        if last is None:
            damaged = damaged_checkpoints(training.output_dir, need_training_state=need_state)
            if damaged:
                shown = "; ".join(damaged[:3]) + ("; ..." if len(damaged) > 3 else "")
                missing_state = all("optimizer/schedule state" in line for line in damaged)
                fix = WEIGHTS_ONLY_HINT if missing_state else "start a new run (another output_dir)"
                raise RecipeError(
                    f"resume_from_checkpoint={value!r} but no checkpoint in output_dir={training.output_dir!r} "
                    f"is intact ({shown}); {fix}"
                )
            raise RecipeError(
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
            raise RecipeError(f"resume_from_checkpoint={checkpoint!r} {_phrase(problem)}; {fix}")
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
        raise RecipeError(
            f"resume_from_checkpoint={checkpoint!r} fails its integrity check: config.json is unreadable; "
            f"resume from an earlier checkpoint-N, or 'latest'"
        ) from None
    task, model = recipe.task, recipe.model
    expected = {"task": task.task, "n_dims": task.n_dims, "n_positions": model.n_positions or task.n_points}
    if not model.backbone_name_or_path:
        expected.update(n_embd=model.n_embd, n_layer=model.n_layer, n_head=model.n_head)
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            raise RecipeError(
                f"resume_from_checkpoint={checkpoint!r} was trained with {key}={saved[key]!r} but the recipe "
                f"says {key}={value!r}; resume with the run's own recipe ({_saved_recipe(recipe)})"
            )


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
            f"({_saved_recipe_path(checkpoint)})"
        )


def _saved_recipe_path(checkpoint: str) -> str:
    return str(Path(checkpoint).parent / "recipe.yaml")


def _saved_recipe(recipe: Recipe) -> str:
    return str(Path(recipe.training.output_dir) / "recipe.yaml")


def make_output_dir(output_dir: str) -> None:
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RecipeError(
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
    found = previous_run(output_dir) if resume is None else []
    if not found:
        return
    if not training.overwrite_output_dir:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise RecipeError(
            f"output_dir={output_dir!r} already holds a run ({shown}); pass --resume_from_checkpoint latest "
            f"to continue it, --overwrite_output_dir true to start over, or choose another output_dir"
        )
    if training.process_index == 0:
        removed = remove_checkpoints(output_dir)
        if removed:
            logger.warning("overwrite_output_dir: removed %s from %s", ", ".join(removed), output_dir)


def run(recipe: Recipe) -> dict[str, float]:
    """Train as the recipe says; returns the final training metrics.

    The run holds ``output_dir``'s lock from its first check to its final save, records itself
    in ``run_status.json``/``run_history.jsonl``, and stops cleanly on SIGTERM/SIGUSR1 (a
    checkpoint, no final model: ``RunInterrupted``) or Ctrl-C (``RunInterrupted``, code 130).
    """
    validate(recipe)
    extras.check_recipe(recipe)  # e.g. LoRA without peft: one line naming the extra
    training = recipe.training
    make_output_dir(training.output_dir)
    with RunGuard(training.output_dir, training.process_index) as guard:
        try:
            return _run(recipe, guard)
        except KeyboardInterrupt:
            guard.end("interrupted", signal="SIGINT")
            raise RunInterrupted(_ctrl_c_message(recipe, guard), EXIT_CTRL_C) from None
        except (OSError, RuntimeError) as error:
            storage = storage_error(error, training.output_dir, guard.step)
            if storage is None:
                raise
            guard.end("failed", error=str(storage))
            raise storage from None


def _ctrl_c_message(recipe: Recipe, guard: RunGuard) -> str:
    training = recipe.training
    step = guard.step
    where = f" at step {step} of {training.max_steps}" if step is not None else " before training started"
    last = latest_checkpoint(training.output_dir, verify=False)
    kept = (
        f"the last checkpoint is {last}: resume with --resume_from_checkpoint latest"
        if last
        else "no checkpoint was saved"
    )
    return f"interrupted (Ctrl-C){where}; {kept}"


def _run(recipe: Recipe, guard: RunGuard) -> dict[str, float]:
    from .trainer import ConMLTrainer  # imports deepspeed when installed: keep --help fast

    training = recipe.training
    resume = resolve_resume(recipe)
    prepare_output_dir(recipe, resume)  # every check happens before the model is built
    start_step = checkpoint_step(resume) if resume is not None else 0
    global_batch = (
        training.per_device_train_batch_size * training.world_size * training.gradient_accumulation_steps
    )
    changes = check_resume(recipe, resume, start_step, global_batch) if resume is not None else {}
    tracking.log_recipe(recipe)
    model = build_model(recipe)
    if resume is not None:
        check_checkpoint_weights(resume, model)
    trainer_class = (
        weights_only(ConMLTrainer) if resume is not None and training.resume_weights_only else ConMLTrainer
    )
    with push_errors_explained(training, trained=False):  # push_to_hub creates the repo here
        trainer = trainer_class(
            model=model,
            args=training,
            train_dataset=build_sampler(recipe),
            eval_dataset=build_eval_prompts(recipe),
            compute_metrics=build_compute_metrics(recipe),
            conml_args=recipe.conml,
        )
    guard.attach(trainer)  # SIGTERM/SIGUSR1: checkpoint at the next step end, then stop
    trainer.add_callback(CheckpointManifest())  # after the stop callback: sees its should_save
    settings = recipe.to_dict()
    if trainer.is_world_process_zero():
        Path(training.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(training.output_dir) / "recipe.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    guard.start(settings, start_step, resume, world_size=training.world_size, global_batch_size=global_batch,
                changes=changes)  # fmt: skip
    tracking.attach(recipe)  # after recipe.yaml: every report_to backend records every recipe key
    tracking.add_callbacks(trainer)
    if resume is not None:
        logger.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    stopped = guard.stop.stopped_at
    if stopped is not None and stopped < training.max_steps:
        checkpoint = str(Path(training.output_dir) / f"checkpoint-{stopped}")
        name = signal.Signals(guard.stop.signal).name
        guard.end("interrupted", signal=name, checkpoint=checkpoint)
        raise RunInterrupted(
            f"stopped by {name} after step {stopped} of {training.max_steps}: saved {checkpoint}, no final "
            f"model; resume with --resume_from_checkpoint latest (exit status {EXIT_INTERRUPTED})",
            EXIT_INTERRUPTED,
        )
    metrics = dict(result.metrics)
    if result.global_step == start_step and resume is not None:
        _nothing_trained(trainer, guard, metrics, resume)
    guard.trained(metrics)  # kept in run_history.jsonl: a kill during the final save loses nothing
    trainer.save_state()
    with push_errors_explained(training, trained=True):
        trainer.save_model()  # the final model and its card; pushed when push_to_hub
    guard.end("finished", metrics=metrics)
    return metrics


def _nothing_trained(trainer, guard: RunGuard, metrics: dict[str, float], resume: str) -> None:
    """Resuming a checkpoint at max_steps trains no step: the Trainer then reports train_loss=0.0.
    Keep the train_loss the run recorded when it trained those steps (or none at all)."""
    recorded = guard.recorded_metrics(trainer.state.global_step).get("train_loss")
    logger.info("%s is at max_steps=%s: nothing left to train; writing the final model", resume,
                trainer.args.max_steps)  # fmt: skip
    last = trainer.state.log_history[-1] if trainer.state.log_history else {}
    for logged in (metrics, last):
        if "train_loss" in logged:
            if recorded is None:
                del logged["train_loss"]
            else:
                logged["train_loss"] = recorded


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


def _finish_distributed(wait: bool = True) -> bool:
    """A clean shutdown: without it, multi-process runs sometimes abort at exit.

    After an unexpected error on this process (``wait=False``) there is no barrier: the other
    processes may be inside a collective that this one will never join, and waiting would hang
    the run forever; leaving lets the launcher (torchrun) stop them and report the error.
    Returns whether this was a multi-process run.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return True
    return False


def _leave_now(code: int) -> None:
    """End a finished multi-process run's process without the interpreter's teardown.

    Everything is saved and the process group is gone, yet destroying torch.distributed's and
    DeepSpeed's C++ objects at exit sometimes aborts the process ("terminate called without
    an active exception", SIGABRT; measured: 1 run in 6 under ZeRO-3 on CPU), and the launcher
    then reports the finished run as failed.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """``python -m icl_conml.train [RECIPE] [--key value ...]``; returns the exit status.

    Errors follow ``icl_conml.errors`` (one line; 2: a user error, 3: a non-finite loss, 75: a
    signal stop after a checkpoint, 130: Ctrl-C; ``--traceback``, or a bare ``--debug``, for the
    stack). ``--debug VALUE`` is ``TrainingArguments.debug``.
    """
    ended: dict[str, bool] = {}
    code = run_main(lambda args: _train(args, ended), argv, debug_alias=True)
    if ended.get("distributed"):
        _leave_now(code)
    return code


def _train(argv: list[str], ended: dict[str, bool]) -> int:
    """Parse, validate and run; ``ended["distributed"]``: whether a process group was shut down."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    crashed = True
    try:
        try:
            recipe = parse_recipe(argv)
        except KeyboardInterrupt:
            raise RunInterrupted("interrupted (Ctrl-C) before training started", EXIT_CTRL_C) from None
        metrics = run(recipe)  # run() validates before anything is built
        crashed = False
        logger.info("finished: %s", metrics)
    except RunInterrupted as error:
        crashed = error.code == EXIT_CTRL_C  # a signal stop ends every process after the same step
        raise
    finally:
        ended["distributed"] = _finish_distributed(wait=not crashed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
