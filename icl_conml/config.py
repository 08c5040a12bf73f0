"""The recipe API in one import: ``from icl_conml.config import parse_recipe, validate, Recipe, RecipeError``.

A recipe goes through four modules, each with one job:

- ``arguments``: the keys, as one dataclass per section (``ModelArguments``, ``TaskArguments``,
  ``ConMLArguments``, ``ICLTrainingArguments``) with types, defaults, help and per-section
  checks; ``Recipe`` (the four sections, ``to_dict``: the resolved recipe); ``RecipeError``;
- ``recipe_files``: reading a recipe file (a packaged name or a YAML path), refusing what is
  not a recipe or hides a mistake;
- ``recipe_parser``: ``parse_recipe``: ``[RECIPE] [--key value ...]`` into a ``Recipe`` (YAML
  values as defaults, flags override), one line per error;
- ``recipe_checks``: ``validate``: the checks across sections, before anything is built.

Every user error is a ``RecipeError``: one line naming the key, the value and the fix (exit 2).
The package's own modules import from those four directly; this module only re-exports.
"""

from __future__ import annotations

from .arguments import (
    ConMLArguments,
    ICLTrainingArguments,
    ModelArguments,
    Recipe,
    RecipeError,
    TaskArguments,
    known_keys,
)
from .recipe_checks import validate
from .recipe_parser import build_parser, parse_recipe

__all__ = [
    "ConMLArguments",
    "ICLTrainingArguments",
    "ModelArguments",
    "Recipe",
    "RecipeError",
    "TaskArguments",
    "build_parser",
    "known_keys",
    "parse_recipe",
    "validate",
]
