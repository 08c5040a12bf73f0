"""Whether models A_i and B_i of ``compare`` are pairs, by the experiment analysis' rules.

A pair shares its seed (hence its initial weights and training prompts) and its training
length; the models of one side differ only in their seed (one arm of a study). What the two sides
differ in is the comparison. Read from each local model folder's ``recipe.yaml`` and
``trainer_state.json`` (data: parsed with the recipe's YAML hardening, nothing imported); a
model without them (a Hub id, a model object) cannot be checked and is said so in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .arguments import EvaluationError


def run_facts(model: Any) -> dict[str, Any] | None:
    """A local model folder's resolved recipe and trained step, or None where it has none."""
    folder = Path(model if isinstance(model, str | Path) else getattr(model, "name_or_path", "") or "")
    if not str(folder) or not (folder / "recipe.yaml").is_file():
        return None
    from ..recipe_files import _RecipeLoader

    try:
        recipe = yaml.load((folder / "recipe.yaml").read_text(encoding="utf-8"), Loader=_RecipeLoader)  # noqa: S506
    except Exception:  # noqa: BLE001 - an unreadable recipe leaves the pair unchecked, not the comparison
        return None
    if not isinstance(recipe, dict):
        return None
    step = None
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        step = int(state.get("global_step")) if isinstance(state, dict) else None
    except (OSError, ValueError, TypeError):
        pass
    return {"recipe": recipe, "seed": recipe.get("seed"), "steps": step if step else recipe.get("max_steps")}


def _describe(name: str, facts: dict[str, Any]) -> str:
    return f"{name!r} (seed {facts['seed']}, {facts['steps']} steps)"


def check_pairs(ids_a: list[str], ids_b: list[str], models_a: list[Any], models_b: list[Any]) -> str:
    """Refuse (one ``EvaluationError`` line) models that are not pairs; returns how the pairing was
    checked ("checked" or which models could not be) for the metadata."""
    from ..run_settings import setting_differences
    from ..tasks import resolve_task_class

    facts_a = [run_facts(m) for m in models_a]
    facts_b = [run_facts(m) for m in models_b]
    rule = "a pair shares its seed and training length, and one side's models differ only in their seed"
    for name_a, name_b, a, b in zip(ids_a, ids_b, facts_a, facts_b, strict=True):
        if a is None or b is None:
            continue
        if a["seed"] != b["seed"] or a["steps"] != b["steps"]:
            raise EvaluationError(
                f"A {_describe(name_a, a)} and B {_describe(name_b, b)} are not a pair ({rule}); give A and "
                f"B in matching order, models of the same seeds and length"
            )
    for side, ids, facts in (("A", ids_a, facts_a), ("B", ids_b, facts_b)):
        known = [(name, f) for name, f in zip(ids, facts, strict=True) if f is not None]
        for name, f in known[1:]:
            first_name, first = known[0]
            try:  # a registered task only: a model folder is data, an import path in it is not imported
                task = resolve_task_class(str(first["recipe"].get("task", "linear_regression")))
            except ValueError:
                task = None
            differ = setting_differences(f["recipe"], first["recipe"], task)
            if differ:
                shown = ", ".join(f"{k}: {x!r} vs {y!r}" for k, x, y in differ[:3])
                raise EvaluationError(
                    f"{side} models {first_name!r} and {name!r} differ outside their seed ({shown}); the models "
                    f"of one side must be one setting trained from different seeds ({rule})"
                )
    unchecked = [n for n, f in zip([*ids_a, *ids_b], [*facts_a, *facts_b], strict=True) if f is None]
    return "checked" if not unchecked else f"not checked for {', '.join(unchecked)} (no recipe.yaml)"
