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

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..run_settings import RUN_IDENTITY_KEYS, same_setting, setting_differences, short


class ExperimentError(UserError, ValueError):
    """A user error in a spec or its records: reported as one line (exit 2)."""


#: Keys every record has and the analysis reads.
REQUIRED_KEYS = ("arm", "seed", "recipe", "n_dims", "final_curve", "eval_history")
__all__ = ["RUN_IDENTITY_KEYS", "ExperimentError", "read_record", "check_record_matches"]


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


def check_record_matches(
    path: Path, record: dict[str, Any], arm: str, seed: int, expected: dict[str, Any], evaluation: dict
) -> None:
    """Refuse (one line) a record that is not the run ``arm``/``seed`` with the ``expected``
    resolved recipe and ``evaluation`` (n_prompts, seed, eval_set) would be."""
    from ..tasks import resolve_task_class

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
        if key in recorded_eval and not same_setting(recorded_eval[key], evaluation.get(key)):
            differences.append((f"eval.{key}", recorded_eval[key], evaluation.get(key)))
    if differences:
        shown = ", ".join(f"{key} {short(a)} (record) vs {short(b)} (spec)" for key, a, b in differences[:3])
        more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
        raise ExperimentError(
            f"{where} was trained with other settings than this spec's arm {arm!r} ({shown}{more}); "
            f"another spec shares the records folder with an arm of the same name: rename the arm, or "
            f"give this spec its own records_dir (--records_dir DIR)"
        )


def expected_settings(spec: Any) -> dict[str, dict[str, Any]]:
    """Each arm's resolved recipe (``Recipe.to_dict``) as the training command will resolve it,
    for the spec's first seed (the seed and run folder are the run's identity, not compared)."""
    from ..arguments import RecipeError
    from ..recipe_parser import parse_recipe

    settings = {}
    for run in spec.runs()[: len(spec.arms)]:
        try:
            settings[run.arm] = parse_recipe(run.train_args()).to_dict()
        except RecipeError as error:
            raise ExperimentError(
                f"spec {spec.path}: arm {run.arm!r} is not a valid recipe: {error}"
            ) from None
    return settings
