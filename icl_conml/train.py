"""Train an in-context learner: ``python -m icl_conml.train [RECIPE.yaml] [--key value ...]``.

The same command runs under ``accelerate launch`` on one CPU, one GPU or many processes.
Without a recipe it runs the built-in quickstart (a CPU-sized linear-regression run).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from transformers import set_seed

from .config import Recipe, RecipeError, parse_recipe, validate
from .data import ConMLSampling, Curriculum, FixedPrompts, PromptSampler, Schedule
from .hub import push_errors_explained
from .modeling import ICLConfig, ICLModel
from .tasks import get_task

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger("icl_conml")


def build_model(recipe: Recipe) -> ICLModel | PeftModel:
    """A freshly initialised model for the recipe (seeded by ``seed``).

    With ``backbone_name_or_path`` the backbone is that pretrained model; with ``lora_r > 0``
    the result is a ``peft.PeftModel`` training LoRA adapters and read-in/read-out only.
    """
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
        task=task.task,
        task_kwargs=task.task_kwargs,
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
        task=get_task(task_args.task, task_args.n_dims, **task_args.task_kwargs),
        curriculum=build_curriculum(recipe),
        global_batch_size=global_batch,
        seed=training.data_seed if training.data_seed is not None else training.seed,
        task_pool_size=task_args.task_pool_size,
        conml_sampling=sampling,
    )


def build_eval_prompts(recipe: Recipe) -> FixedPrompts | None:
    task_args = recipe.task
    if task_args.eval_n_prompts == 0:
        return None
    task = get_task(task_args.task, task_args.n_dims, **task_args.task_kwargs)
    return FixedPrompts.sample(task, task_args.eval_n_prompts, task_args.n_points, seed=recipe.training.seed)


def run(recipe: Recipe) -> dict[str, float]:
    """Train as the recipe says; returns the final training metrics."""
    from .trainer import ConMLTrainer  # imports deepspeed when installed: keep --help fast

    validate(recipe)
    training = recipe.training
    model = build_model(recipe)
    with push_errors_explained(training, trained=False):  # push_to_hub creates the repo here
        trainer = ConMLTrainer(
            model=model,
            args=training,
            train_dataset=build_sampler(recipe),
            eval_dataset=build_eval_prompts(recipe),
            conml_args=recipe.conml,
        )
    if trainer.is_world_process_zero():
        Path(training.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(training.output_dir) / "recipe.yaml").write_text(
            yaml.safe_dump(recipe.to_dict(), sort_keys=False)
        )
    result = trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    trainer.save_state()
    with push_errors_explained(training, trained=True):
        trainer.save_model()  # the final model and its card; pushed when push_to_hub
    return result.metrics


def _finish_distributed() -> None:
    """A clean shutdown: without it, multi-process runs sometimes abort at exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        recipe = parse_recipe(argv)
        validate(recipe)
        metrics = run(recipe)
    except RecipeError as error:
        if debug:
            raise
        print(f"icl_conml: error: {error}", file=sys.stderr)
        return 2
    finally:
        _finish_distributed()
    logger.info("finished: %s", metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
