"""A study's run records as data: read each one defensively, and decide whether a record is the
run a spec asks for.

A record is a file from disk (possibly copied, truncated, or written by another spec or an older
version of the code): reading it never imports or runs anything, and a damaged one is one
``ExperimentError`` line naming the file. A record is reused only if the settings it was trained
with equal the spec's for that run. Records written by older code lack the recipe keys added
since: a key a recipe does not hold equals that key's default (so a new key whose default keeps
the old behaviour never makes an old record "different").
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import cache
from pathlib import Path
from typing import Any

from .errors import UserError

# Keys that identify a run rather than its experiment: never compared when pairing runs.
RUN_IDENTITY_KEYS = frozenset(
    {"seed", "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "run_name", "logging_dir"}
)
# Keys that change what is logged or kept, not what is trained or evaluated.
BOOKKEEPING_KEYS = frozenset(
    {"report_to", "disable_tqdm", "logging_steps", "logging_strategy", "save_steps", "save_strategy",
     "save_total_limit", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo"}
)  # fmt: skip


class ExperimentError(UserError, ValueError):
    """A user error in a spec or its records: reported as one line (exit 2)."""


#: Keys every record has and the analysis reads.
REQUIRED_KEYS = ("arm", "seed", "recipe", "n_dims", "final_curve", "eval_history")
#: Recipe keys that never change what a run trains or how it is evaluated (besides the run's
#: identity and bookkeeping): the evaluation strategy is always "steps", set by the experiment.
_NOT_COMPARED = RUN_IDENTITY_KEYS | BOOKKEEPING_KEYS | {"eval_strategy"}
_ABSENT = object()


def read_record(path: Path) -> dict[str, Any]:
    """A record's JSON, checked to be one (a truncated or foreign file is one line naming it)."""
    fix = f"delete {path} and re-run the experiment to rebuild it (the run is retrained or resumed)"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ExperimentError(f"record {path} cannot be read ({error}); {fix}") from None
    except ValueError as error:
        raise ExperimentError(
            f"record {path} is not valid JSON ({error.args[0] if error.args else error}; truncated?); {fix}"
        ) from None
    if not isinstance(record, dict):
        raise ExperimentError(f"record {path} is not a run record (a JSON object); {fix}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ExperimentError(f"record {path} lacks {', '.join(missing)}: not a whole run record; {fix}")
    curve = record["final_curve"].get("mean") if isinstance(record["final_curve"], dict) else None
    if (
        not isinstance(curve, list)
        or not curve
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in curve)
        or not isinstance(record["eval_history"], list)
        or not isinstance(record["recipe"], dict)
    ):
        raise ExperimentError(f"record {path} has a malformed final_curve, eval_history or recipe; {fix}")
    return record


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
        if key not in _NOT_COMPARED and key not in FLAT_TASK_KEYS and key != "task_kwargs"
    }
    hyperparameters = _task_hyperparameters(recipe, task_class)
    if hyperparameters is not None:
        settings["task_hyperparameters"] = hyperparameters
    return settings


def _same(a: Any, b: Any) -> bool:
    """Equal as settings: numbers by value (1 == 1.0), containers element by element."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
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
        if not _same(a, b):
            differences.append((key, a, b))
    return differences


def check_record_matches(
    path: Path, record: dict[str, Any], arm: str, seed: int, expected: dict[str, Any], evaluation: dict
) -> None:
    """Refuse (one line) a record that is not the run ``arm``/``seed`` with the ``expected``
    resolved recipe and ``evaluation`` (n_prompts, seed, eval_set) would be."""
    from .tasks import resolve_task_class

    where = f"record {path}"
    if record.get("arm") != arm or record.get("seed") != seed:
        raise ExperimentError(
            f"{where} is run {record.get('arm')}/seed{record.get('seed')}, not {arm}/seed{seed}: a record "
            f"copied to the wrong place; move or delete it"
        )
    task = expected.get("task")
    # The expected recipe is the user's own (its task class is imported by the recipe parser); a
    # record's task name is never imported from here.
    try:
        task_class = resolve_task_class(str(task), allow_import=True)
    except ValueError:
        task_class = None
    differences = setting_differences(record["recipe"], expected, task_class)
    recorded_eval = record.get("eval") or {}
    # With an eval set, the prompts are the set's (n_prompts and seed do not apply).
    for key in ("eval_set",) if evaluation.get("eval_set") else ("n_prompts", "seed", "eval_set"):
        if key in recorded_eval and not _same(recorded_eval[key], evaluation.get(key)):
            differences.append((f"eval.{key}", recorded_eval[key], evaluation.get(key)))
    if differences:
        shown = ", ".join(
            f"{key} {_short(a)} (record) vs {_short(b)} (spec)" for key, a, b in differences[:3]
        )
        more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
        raise ExperimentError(
            f"{where} was trained with other settings than this spec's arm {arm!r} ({shown}{more}); "
            f"another spec shares the records folder with an arm of the same name: rename the arm, or "
            f"give this spec its own records_dir (--records_dir DIR)"
        )


def expected_settings(spec: Any) -> dict[str, dict[str, Any]]:
    """Each arm's resolved recipe (``Recipe.to_dict``) as the training command will resolve it,
    for the spec's first seed (the seed and run folder are the run's identity, not compared)."""
    from .arguments import RecipeError
    from .recipe_parser import parse_recipe

    settings = {}
    for run in spec.runs()[: len(spec.arms)]:
        try:
            settings[run.arm] = parse_recipe(run.train_args()).to_dict()
        except RecipeError as error:
            raise ExperimentError(
                f"spec {spec.path}: arm {run.arm!r} is not a valid recipe: {error}"
            ) from None
    return settings


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
