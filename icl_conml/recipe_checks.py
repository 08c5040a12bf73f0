"""Checks across the recipe's sections, run before anything is built (``validate``).

Each section checks its own values when it is built (``arguments``); here are the checks that
need several sections or the machine: sizes against n_positions and memory, the batch ConML
needs, an attention kernel that can apply ConML's mask, finite optimiser numbers, an installed
``report_to`` backend. Each failure is one ``RecipeError`` line naming the keys and the fix.
"""

from __future__ import annotations

import math

from transformers import TrainingArguments

from .arguments import ConMLArguments, ModelArguments, Recipe, check_choice, plain_value, require


def validate(recipe: Recipe) -> None:
    """Checks that involve several sections (each section checks itself on construction)."""
    task, model, conml_args, training = recipe.task, recipe.model, recipe.conml, recipe.training
    if model.n_positions is not None:
        require(
            model.n_positions >= task.n_points,
            f"n_points={task.n_points} is beyond the model's n_positions={model.n_positions}; "
            f"raise n_positions or lower n_points",
        )
    require(
        training.max_steps >= 1,
        f"max_steps={training.max_steps} must be >= 1 (prompts are generated on the fly)",
    )
    require(
        training.per_device_train_batch_size >= 1,
        f"per_device_train_batch_size={training.per_device_train_batch_size} must be >= 1",
    )
    _validate_reporting(training)
    _validate_optimizer(training)
    _validate_sizes(recipe)
    require(
        training.gradient_accumulation_steps >= 1,
        f"gradient_accumulation_steps={training.gradient_accumulation_steps} must be >= 1",
    )
    for key in ("logging_steps", "save_steps", "eval_steps"):
        strategy = getattr(training, key.replace("_steps", "_strategy"))
        value = getattr(training, key)
        if plain_value(strategy) == "steps" and value is not None:
            require(value > 0, f"{key}={value} must be > 0 (a number of steps, or a fraction of max_steps)")
    if plain_value(training.eval_strategy) != "no":
        require(
            task.eval_n_prompts > 0 or task.eval_set is not None,
            f"eval_strategy={plain_value(training.eval_strategy)!r} needs an "
            f"eval set but eval_n_prompts=0; set eval_n_prompts > 0 or eval_strategy=no",
        )
    if conml_args.enabled:
        smallest = task.curriculum_points_start or task.n_points
        require(
            smallest >= 2,
            f"ConML needs prompts of at least 2 points to build a view, but the run has {smallest}; "
            f"raise n_points (or curriculum_points_start) or set conml_lambda=0",
        )
        global_batch = training.per_device_train_batch_size * training.world_size
        require(
            global_batch >= 2,
            "ConML needs at least 2 tasks per batch for d_out; raise per_device_train_batch_size",
        )
    _validate_attention(model, conml_args, training)


def _validate_attention(
    model: ModelArguments, conml_args: ConMLArguments, training: TrainingArguments
) -> None:
    """A kernel that cannot apply ConML's probe mask is refused, not left to drop it silently."""
    from .modeling import MASK_KERNELS

    kernel = model.attn_implementation
    if kernel in MASK_KERNELS:
        return
    require(
        not conml_args.enabled,
        f"attn_implementation={kernel} takes no attention mask, which ConML's probe tokens need "
        f"(conml_lambda={conml_args.conml_lambda}); use attn_implementation=sdpa (or eager), or conml_lambda=0",
    )
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    available = is_flash_attn_3_available() if kernel == "flash_attention_3" else is_flash_attn_2_available()
    package = "flash-attn 3 (flash_attn_interface)" if kernel == "flash_attention_3" else "flash-attn"
    require(
        available,
        f"attn_implementation={kernel} needs a CUDA GPU and the {package} package, not found here; "
        f"install it or use attn_implementation=sdpa",
    )
    require(
        training.bf16 or training.fp16,
        f"attn_implementation={kernel} runs in bf16/fp16 only; set bf16: true or use attn_implementation=sdpa",
    )


def _validate_sizes(recipe: Recipe) -> None:
    """Sizes that cannot fit in this machine's memory are refused with the estimate (``memory.py``)."""
    from .memory import too_large, training_memory

    problem = too_large(training_memory(recipe))
    require(
        problem is None,
        f"this recipe {problem}; lower n_dims, n_points, the batch size or eval_n_prompts",
    )


def _validate_optimizer(training: TrainingArguments) -> None:
    """The optimiser's numbers are finite and in range: a NaN or infinite one passes the loss and
    gradient checks of step 1 but poisons its update (or fails deep inside torch)."""
    for key in OPTIMIZER_NUMBERS:
        value = getattr(training, key)
        require(math.isfinite(value), f"{key}={value} must be a finite number")
    require(training.learning_rate >= 0, f"learning_rate={training.learning_rate} must be >= 0")
    require(training.weight_decay >= 0, f"weight_decay={training.weight_decay} must be >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        require(0 <= getattr(training, key) < 1, f"{key}={getattr(training, key)} must be in [0, 1)")
    require(training.adam_epsilon >= 0, f"adam_epsilon={training.adam_epsilon} must be >= 0")


#: ``TrainingArguments`` numbers that must be finite (checked before anything is built).
OPTIMIZER_NUMBERS = (
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "warmup_steps",
)


def _validate_reporting(training: TrainingArguments) -> None:
    """``report_to`` names a known, installed backend (the Trainer would fail after building the model)."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    from .extras import EXTRAS

    available = get_available_reporting_integrations()
    for name in training.report_to or []:
        check_choice("report_to", name, ("none", "all", *INTEGRATION_TO_CALLBACK))
        require(
            name in ("none", "all") or name in available,
            f"report_to={name!r} needs the {name} package, which is not installed; "
            f"pip install {EXTRAS.get(name, name)} or set report_to=none",
        )
