"""Train an in-context learner: ``python -m icl_conml.train [RECIPE.yaml] [--key value ...]``.

The same command runs under ``accelerate launch`` on one CPU, one GPU or many processes.
Without a recipe it runs the built-in quickstart (a CPU-sized linear-regression run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from transformers import TrainingArguments, set_seed

from . import extras, tracking
from .arguments import Recipe, RecipeError
from .callbacks import add_run_callbacks
from .data import ConMLSampling, Curriculum, Prompts, PromptSampler, Schedule
from .distributed import finish as finish_distributed
from .distributed import leave_now
from .errors import EXIT_CTRL_C, run_main
from .hub import push_errors_explained
from .lora import resolve_backbone_path
from .modeling import ICLConfig, ICLModel
from .recipe_checks import validate
from .recipe_parser import parse_recipe
from .runs.checkpoints import CheckpointManifest, checkpoint_step
from .runs.files import write_text
from .runs.guard import RunGuard
from .runs.preemption import RunInterrupted
from .runs.resume import (
    check_checkpoint_weights,
    check_resume,
    make_output_dir,
    nothing_trained,
    prepare_output_dir,
    resolve_resume,
    weights_only,
)
from .summary import run_header, run_summary
from .tasks import FunctionClass, task_reference

if TYPE_CHECKING:
    from peft import PeftModel

    from .trainer import ConMLTrainer

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
    the result is a ``peft.PeftModel`` training LoRA adapters and read-in/read-out only;
    ``freeze_backbone`` freezes the backbone. Loading or adapter errors are one-line
    ``RecipeError``s, raised before training.
    """
    with _whole_weights(recipe.training):
        model = _build_model(recipe)
    if recipe.model.init_perturbation_std > 0:
        perturb_initial_weights(model, recipe.model.init_perturbation_std, recipe.training.seed)
    return model


def perturb_initial_weights(model: torch.nn.Module, std: float, seed: int) -> None:
    """Add N(0, std²) noise to every trainable initial weight, for an A/A control arm.

    The noise comes from a generator of its own (seeded from ``seed``, not from the global RNG), so
    the run's prompts, probes and views stay those of the unperturbed run with the same seed: the
    two runs differ only by a rounding-sized change of the starting point.
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + 0x5EED) % 2**63)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                parameter.add_(noise.to(parameter.dtype) * std)


def _build_model(recipe: Recipe) -> ICLModel | PeftModel:
    """The one ``ICLConfig`` assembly: a fresh GPT-2 or a pretrained backbone, then LoRA / freezing."""
    args = recipe.model
    if args.lora_r > 0 and not args.backbone_name_or_path:
        raise RecipeError(
            f"lora_r={args.lora_r} needs a pretrained backbone_name_or_path (e.g. gpt2): LoRA on a freshly "
            f"initialised backbone could never be reloaded, its random weights are not saved; set lora_r=0"
        )
    task = recipe.function_class
    config = {
        "n_dims": recipe.task.n_dims,
        "n_positions": recipe.n_positions,
        "task": task_reference(task),
        "task_kwargs": task.hyperparameters(),
        "attn_implementation": args.attn_implementation,
    }
    set_seed(recipe.training.seed)
    if args.backbone_name_or_path:
        model = _pretrained_backbone(args.backbone_name_or_path, task, config)
    else:
        size = {
            "n_embd": args.n_embd,
            "n_layer": args.n_layer,
            "n_head": args.n_head,
            "dropout": args.dropout,
            "activation_function": args.activation_function,
        }
        model = ICLModel(ICLConfig(**size, **config), task_class=task)
    if not (args.backbone_name_or_path or args.lora_r > 0 or args.freeze_backbone):
        return model
    from .lora import prepare_model

    limit = getattr(model.config.backbone_config, "max_position_embeddings", None)
    if limit is not None and 2 * recipe.n_positions + 1 > limit:
        raise RecipeError(
            f"n_positions={recipe.n_positions} pairs need {2 * recipe.n_positions + 1} token positions but "
            f"the backbone has {limit}; lower n_points / n_positions"
        )
    return prepare_model(model, args)


def _pretrained_backbone(name: str, task: FunctionClass, config: dict[str, Any]) -> ICLModel:
    """``ICLModel.from_pretrained_backbone``, a load failure as one ``RecipeError`` line."""
    try:
        return ICLModel.from_pretrained_backbone(name, task_class=task, **config)
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise RecipeError(
            f"backbone_name_or_path={name!r} could not be loaded ({first}); pass a local folder or a Hub id "
            f"of an AutoModel that takes inputs_embeds (offline: one in the HF cache)"
        ) from None


def build_trainer(
    recipe: Recipe,
    *,
    model: ICLModel | PeftModel | None = None,
    trainer_class: type | None = None,
    **overrides,
) -> ConMLTrainer:
    """The trainer the recipe describes: its model (``build_model`` unless ``model`` is given),
    training prompts, evaluation prompts and metrics, and ConML settings.

    ``trainer_class``: a ``ConMLTrainer`` subclass; ``overrides``: other ``Trainer`` arguments
    (``callbacks``, or a ``train_dataset`` in place of the recipe's sampler). What ``train``
    runs, and what benchmarks and tests build.
    """
    from .trainer import ConMLTrainer  # imports deepspeed when installed: keep --help fast

    model = build_model(recipe) if model is None else model
    if "train_dataset" not in overrides:
        overrides["train_dataset"] = build_sampler(recipe)
    return (trainer_class or ConMLTrainer)(
        model=model,
        args=recipe.training,
        eval_dataset=build_eval_prompts(recipe),
        compute_metrics=build_compute_metrics(recipe),
        conml_args=recipe.conml,
        **overrides,
    )


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
    return PromptSampler(
        task=recipe.function_class,
        curriculum=build_curriculum(recipe),
        global_batch_size=recipe.global_batch_size,
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
    return Prompts.sample(
        recipe.function_class, task_args.eval_n_prompts, task_args.n_points, seed=task_args.eval_seed
    )


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
    limit = recipe.n_positions
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
    return curve_metrics(recipe.function_class)


def run(recipe: Recipe) -> dict[str, float]:
    """Train as the recipe says; returns the final training metrics.

    The run holds ``output_dir``'s lock from its first check to its final save, records itself
    in ``run_status.json``/``run_history.jsonl``, and stops cleanly on SIGTERM/SIGUSR1 (a
    checkpoint, no final model: ``RunInterrupted``) or Ctrl-C (``RunInterrupted``, code 130).
    """
    validate(recipe)
    extras.check_recipe(recipe)  # e.g. LoRA without peft: one line naming the extra
    resolve_backbone_path(recipe)  # a local backbone is recorded by its absolute path
    training = recipe.training
    created = _first_missing(training.output_dir) if training.process_index == 0 else None
    make_output_dir(training.output_dir)
    try:
        with RunGuard(training.output_dir, training.process_index) as guard:
            return _run(recipe, guard)
    except BaseException:
        if created is not None:  # a refused run leaves no folder holding only its .lock
            _remove_if_only_lock(Path(training.output_dir), created)
        raise


def _first_missing(folder: str) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (``None``: it exists)."""
    path, missing = Path(folder).absolute(), None
    while not path.exists() and path != path.parent:
        path, missing = path.parent, path
    return missing


def _remove_if_only_lock(folder: Path, created: Path) -> None:
    """Remove ``folder`` (and the parents up to ``created`` that this run made) if it holds
    nothing but the run lock: the run was refused before writing anything."""
    from .runs.lock import LOCK_NAME

    try:
        if {entry.name for entry in folder.iterdir()} - {LOCK_NAME}:
            return
        (folder / LOCK_NAME).unlink(missing_ok=True)
        folder = folder.absolute()
        while True:
            folder.rmdir()  # only empty folders: anything another process wrote stays
            if folder == created:
                return
            folder = folder.parent
    except OSError:
        return


def _run(recipe: Recipe, guard: RunGuard) -> dict[str, float]:
    from .trainer import ConMLTrainer  # imports deepspeed when installed: keep --help fast

    training = recipe.training
    resume = resolve_resume(recipe)
    guard.verify_lock()  # .lock still ours before an overwrite deletes anything
    prepare_output_dir(recipe, resume)  # every check happens before the model is built
    start_step = checkpoint_step(resume) if resume is not None else 0
    global_batch = recipe.global_batch_size
    changes = check_resume(recipe, resume, start_step, global_batch) if resume is not None else {}
    model = build_model(recipe)
    if resume is not None:
        check_checkpoint_weights(resume, model)
    trainer_class = (
        weights_only(ConMLTrainer) if resume is not None and training.resume_weights_only else ConMLTrainer
    )
    with push_errors_explained(training, trained=False):  # push_to_hub creates the repo here
        trainer = build_trainer(recipe, model=model, trainer_class=trainer_class)
    guard.attach(trainer)  # SIGTERM/SIGUSR1: checkpoint at the next step end, then stop
    trainer.add_callback(CheckpointManifest())  # after the stop callback: sees its should_save
    add_run_callbacks(trainer, recipe.function_class)  # console lines, icl_error, training_curves.png
    settings = recipe.to_dict()
    if trainer.is_world_process_zero():
        Path(training.output_dir).mkdir(parents=True, exist_ok=True)
        write_text(Path(training.output_dir) / "recipe.yaml", yaml.safe_dump(settings, sort_keys=False))
    guard.start(settings, start_step, resume, world_size=training.world_size, global_batch_size=global_batch,
                changes=changes)  # fmt: skip
    if trainer.is_world_process_zero():  # every check passed: what will run (every key: recipe.yaml)
        logger.info("%s", run_header(recipe, model))
    tracking.attach(recipe)  # after recipe.yaml: every report_to backend records every recipe key
    tracking.add_callbacks(trainer)
    if resume is not None:
        logger.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    guard.end_if_stopped(training.max_steps)  # a stop signal: checkpoint saved, RunInterrupted (75)
    metrics = dict(result.metrics)
    if result.global_step == start_step and resume is not None:
        nothing_trained(trainer, metrics, resume)
    guard.trained(metrics)  # kept in run_history.jsonl: a kill during the final save loses nothing
    guard.verify_lock()
    trainer.save_state()
    with push_errors_explained(training, trained=True):
        trainer.save_model()  # the final model and its card; pushed when push_to_hub
    guard.end("finished", metrics=metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m icl_conml.train [RECIPE] [--key value ...]``; returns the exit status.

    Errors follow ``icl_conml.errors`` (one line; 2: a user error, 3: a non-finite loss, 75: a
    signal stop after a checkpoint, 130: Ctrl-C; ``--traceback``, or a bare ``--debug``, for the
    stack). ``--debug VALUE`` is ``TrainingArguments.debug``.
    """
    ended: dict[str, bool] = {}
    code = run_main(lambda args: _train(args, ended), argv, debug_alias=True)
    if ended.get("distributed"):
        leave_now(code)
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
        if recipe.training.process_index == 0:
            # Outside ZeRO-3's partitioned construction: the summary reloads the model in this
            # process alone, and a partitioned build would wait for the other processes for ever.
            with _whole_weights(recipe.training):
                print(run_summary(recipe, metrics), flush=True)
    except RunInterrupted as error:
        crashed = error.code == EXIT_CTRL_C  # a signal stop ends every process after the same step
        raise
    finally:
        ended["distributed"] = finish_distributed(wait=not crashed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
