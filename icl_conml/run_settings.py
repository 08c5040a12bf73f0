"""Whether two runs were trained with the same settings: their resolved recipes compared in one
spelling, whatever version of the code wrote them.

Used where runs are paired or reused (the experiment's records, ``compare``'s model folders).
Keys whose declared role is not paired (output, bookkeeping, run control: ``arguments.KeyRole``)
and the run's identity (seed, folder) are not compared; the task's hyper-parameters are
(``task_kwargs`` and the flat keys merged, class defaults filled in). A key one recipe does not
hold equals that key's default, so a key added later whose default keeps the old behaviour never
makes an old run "different". Nothing named in a recipe is imported.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cache
from typing import Any

# Keys that identify a run rather than its experiment: never compared when pairing runs.
RUN_IDENTITY_KEYS = frozenset(
    {"seed", "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "run_name", "logging_dir"}
)


def is_compared(key: str) -> bool:
    """Whether two runs that differ in ``key`` ran different settings: not for the run's identity,
    a key whose role is not paired (``arguments.KeyRole``: output, bookkeeping, run control) or
    the evaluation strategy (always "steps" in a study)."""
    from .arguments import key_role

    role = key_role(key)
    return key not in RUN_IDENTITY_KEYS and key != "eval_strategy" and (role is None or role.paired)


_ABSENT = object()


@cache
def recipe_defaults() -> dict[str, Any]:
    """Every recipe key's default value, as plain data (what a recipe that omits the key runs with)."""
    from .arguments import SECTIONS, plain_value

    defaults: dict[str, Any] = {}
    for section in SECTIONS:
        for field in dataclasses.fields(section):
            if not field.init or field.name in defaults:
                continue
            if field.default is not dataclasses.MISSING:
                defaults[field.name] = plain_value(field.default)
            elif field.default_factory is not dataclasses.MISSING:
                defaults[field.name] = plain_value(field.default_factory())
    return defaults


def _task_hyperparameters(recipe: dict[str, Any], task_class: type | None) -> dict[str, Any] | None:
    """The task's hyper-parameters in one spelling (``task_kwargs`` and the flat keys merged, class
    defaults filled in), whatever the code version wrote; None when the class is unknown."""
    from .arguments import FLAT_TASK_KEYS

    if task_class is None:
        return None
    values = {
        f.name: f.default
        for f in dataclasses.fields(task_class)
        if f.init and f.name != "n_dims" and f.default is not dataclasses.MISSING
    }
    kwargs = recipe.get("task_kwargs")
    if isinstance(kwargs, dict):
        values.update(kwargs)
    for key in FLAT_TASK_KEYS:
        if key in values and recipe.get(key) is not None:
            values[key] = recipe[key]
    return values


def comparable_settings(recipe: dict[str, Any], task_class: type | None) -> dict[str, Any]:
    """What defines the run in a recipe: bookkeeping and run identity dropped, task
    hyper-parameters in one spelling."""
    from .arguments import FLAT_TASK_KEYS

    settings = {
        key: value
        for key, value in recipe.items()
        if is_compared(key) and key not in FLAT_TASK_KEYS and key != "task_kwargs"
    }
    hyperparameters = _task_hyperparameters(recipe, task_class)
    if hyperparameters is not None:
        settings["task_hyperparameters"] = hyperparameters
    return settings


def same_setting(a: Any, b: Any) -> bool:
    """Equal as settings: numbers by value (1 == 1.0), containers element by element."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_setting(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_setting(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def setting_differences(
    recorded: dict[str, Any], expected: dict[str, Any], task_class: type | None
) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, expected value) for every setting that differs; a key one side does
    not hold counts as its default (a key without a default is compared only where both hold it)."""
    left = comparable_settings(recorded, task_class)
    right = comparable_settings(expected, task_class)
    defaults = recipe_defaults()
    differences = []
    for key in sorted(set(left) | set(right)):
        a, b = left.get(key, defaults.get(key, _ABSENT)), right.get(key, defaults.get(key, _ABSENT))
        if a is _ABSENT or b is _ABSENT:
            continue
        if not same_setting(a, b):
            differences.append((key, a, b))
    return differences


def short(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters (messages stay one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
