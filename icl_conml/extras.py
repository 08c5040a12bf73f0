"""Optional dependencies: which pip extra installs what, and one-line errors that name it.

The core install (``pip install icl_conml``) trains and evaluates; these features need an extra:

| extra | package | for |
|---|---|---|
| ``deepspeed`` | deepspeed | ZeRO-2/3 and offload (``--deepspeed`` or an accelerate DeepSpeed config) |
| ``peft`` | peft | LoRA adapters (``lora_r > 0``) and loading/merging LoRA runs |
| ``tensorboard`` / ``wandb`` | tensorboard / wandb | ``report_to`` backends |
| ``trees`` | scikit-learn | the decision-tree and gradient-boosting reference estimators |
| ``plots`` | matplotlib | ``curves.png`` / ``compare.png`` of the evaluation |
| ``evaluate`` | evaluate | the ``icl_curve`` metric module (``icl_conml.metrics``) |
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .arguments import Recipe

#: Module → the ``pip install`` argument that provides it.
EXTRAS = {
    "deepspeed": "'icl_conml[deepspeed]'",
    "peft": "'icl_conml[peft]'",
    "tensorboard": "'icl_conml[tensorboard]'",
    "wandb": "'icl_conml[wandb]'",
    "sklearn": "'icl_conml[trees]'",
    "matplotlib": "'icl_conml[plots]'",
    "evaluate": "'icl_conml[evaluate]'",
}


class MissingExtra(UserError, ImportError):
    """A feature needs an optional package that is not installed; the message names the extra (exit 2)."""


def is_available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def message(module: str, feature: str) -> str:
    """``FEATURE needs MODULE, which is not installed; pip install 'icl_conml[EXTRA]'``."""
    return f"{feature} needs {module}, which is not installed; pip install {EXTRAS.get(module, module)}"


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` or raise ``MissingExtra`` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(message(module, feature)) from None


def check_recipe(recipe: Recipe) -> None:
    """Before anything is built: the extras the recipe's features need (a one-line ``MissingExtra``)."""
    lora_r = recipe.model.lora_r
    if lora_r > 0 and not is_available("peft"):
        raise MissingExtra(message("peft", f"LoRA (lora_r={lora_r})"))
    deepspeed = (
        recipe.training.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    )
    if deepspeed and not is_available("deepspeed"):
        raise MissingExtra(message("deepspeed", "DeepSpeed (--deepspeed or an accelerate DeepSpeed config)"))
