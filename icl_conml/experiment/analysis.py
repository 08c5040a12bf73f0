"""The analysis of a paired study: records in, Table 5 with seed-level statistics out.

For each arm A against the reference arm R (plain ICL), per seed (a pair shares initial
weights and training prompts):

- Rel. Min. Error = min_k err_A / min_k err_R (< 1: A's best error is lower).
- Shot Spare = (first k with err_A ≤ min_k err_R × (1 + 10⁻³)) − argmin_k err_R (< 0: A needs
  fewer examples; the relative tolerance ``SHOT_SPARE_TOLERANCE`` keeps an error equal to R's
  minimum up to rounding from counting as "never reached"). When A never reaches R's minimum it
  is **censored**: only "> k_max − argmin" is
  known. Censored pairs are counted and shown, never dropped; the rank test places them as
  their lower bound k_max − argmin + 1 (worse than any defined value).
- meta-training speed: the first training step at which the eval error at k = d (and 2d)
  reaches ε, from the evaluations during training (censored when a run never gets there).

Statistics are over seeds (the seed-to-seed spread dominates at small scale): mean, std (n/a
below 2 values), a paired bootstrap 95% interval of the mean (pairs resampled) and the exact
Wilcoxon signed-rank test (two-sided) of "no difference".
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

# One implementation for the project: evaluation.statistics (re-exported here by their old names).
from ..evaluation.statistics import mean_std, table5_metrics, wilcoxon_signed_rank
from ..evaluation.statistics import pairs_bootstrap_interval as bootstrap_interval
from .aa import against_control, table_number
from .aa import markdown as aa_markdown
from .records import (
    RUN_IDENTITY_KEYS,
    ExperimentError,
    check_record_matches,
    expected_settings,
    read_record,
)

if TYPE_CHECKING:  # a type only: experiment.py (runs and the command line) imports this module
    from .spec import Spec

SIGNIFICANCE = 0.05
#: Shot Spare: the arm "reaches" the reference's minimum error where it is at most this much
#: above it, relatively (errors equal up to float rounding or evaluation noise are not a censor).
SHOT_SPARE_TOLERANCE = 1e-3


# ---- loading and pairing -------------------------------------------------------------------------
def load_records(
    spec: Spec, expected: dict[str, dict[str, Any]] | None = None
) -> dict[tuple[str, int], dict[str, Any]]:
    """The spec's records, each read defensively and checked to be the run the spec asks for
    (``expected``: each arm's resolved recipe, computed when not given)."""
    expected = expected_settings(spec) if expected is None else expected
    evaluation = {"n_prompts": spec.eval.n_prompts, "seed": spec.eval.seed, "eval_set": spec.eval.eval_set}
    records = {}
    for run in spec.runs():
        if run.record_path.is_file():
            record = read_record(run.record_path)
            check_record_matches(run.record_path, record, run.arm, run.seed, expected[run.arm], evaluation)
            records[(run.arm, run.seed)] = record
    return records


def _experiment_settings(recipe: dict[str, Any], ignored: set[str]) -> dict[str, Any]:
    """What defines the experiment in a recorded recipe, in one spelling whatever the code version
    wrote: keys whose role is not paired dropped (``arguments.KeyRole``), and flat task keys (``sparsity``, ``depth``, ...) kept only
    for a task that takes them."""
    from ..arguments import FLAT_TASK_KEYS, key_role
    from ..tasks import hyperparameter_names, resolve_task_class

    try:
        hyperparameters = set(
            # a record is data: an import path it names is not imported (RemoteCodeError is a ValueError)
            hyperparameter_names(
                resolve_task_class(recipe.get("task", "linear_regression"), allow_import=False)
            )
        )
    except ValueError:
        hyperparameters = set()
    flat = set(FLAT_TASK_KEYS) - hyperparameters
    unpaired = {key for key in recipe if (role := key_role(key)) is not None and not role.paired}
    dropped = ignored | unpaired | flat
    return {key: value for key, value in recipe.items() if key not in dropped}


def check_pairing(spec: Spec, records: dict[tuple[str, int], dict[str, Any]]) -> None:
    """Refuse to pair runs whose recorded settings differ outside their arm's keys and the seed."""
    arm_keys = set().union(*(set(overrides) for overrides in spec.arms.values()))
    ignored = arm_keys | RUN_IDENTITY_KEYS
    reference: tuple[str, dict[str, Any]] | None = None
    for (arm, seed), record in sorted(records.items()):
        settings = _experiment_settings(record.get("recipe", {}), ignored)
        settings["attn_implementation"] = record.get("attn_implementation")
        settings["max_steps"] = record.get("max_steps")
        if reference is None:
            reference = (f"{arm}/seed{seed}", settings)
            continue
        name, expected = reference
        # A key one record lacks was not recorded (older runs saved only non-default keys): only
        # keys both recorded can disagree.
        differ = sorted(k for k in set(expected) & set(settings) if expected[k] != settings[k])
        if differ:
            shown = ", ".join(f"{k}: {expected.get(k)!r} vs {settings.get(k)!r}" for k in differ[:4])
            raise ExperimentError(
                f"runs {name} and {arm}/seed{seed} differ outside their arm's keys ({shown}); they cannot be "
                f"paired: re-run the odd one (delete its record) or make the key part of the arms"
            )


# ---- per-pair metrics --------------------------------------------------------------------------------
def table5_pair(
    curve_arm: list[float], curve_ref: list[float], tolerance: float = SHOT_SPARE_TOLERANCE
) -> dict[str, Any]:
    """Rel. Min. Error and (possibly censored) Shot Spare of one pair. The arm reaches the
    reference's minimum where its error is within ``tolerance`` (relative) of it."""
    arm = torch.tensor(curve_arm, dtype=torch.float64)
    ref = torch.tensor(curve_ref, dtype=torch.float64)
    relative, shot_spare = table5_metrics(arm, ref, tolerance)  # the one Table 5 of the project
    best_ref = float(ref.min())
    spare = None if math.isnan(float(shot_spare)) else int(shot_spare)
    return {
        "rel_min_error": float(relative) if best_ref > 0 else math.nan,
        "min_error_arm": float(arm.min()),
        "min_error_ref": best_ref,
        "shot_spare": spare,
        "censored": spare is None,
        "shot_spare_bound": len(curve_ref) - 1 - int(ref.argmin()),  # censored: Shot Spare > this
    }


def steps_to_reach(eval_history: list[dict[str, Any]], k: int, threshold: float) -> int | None:
    """The first evaluated training step whose error at k is ≤ threshold (None: never)."""
    for entry in sorted(eval_history, key=lambda e: e["step"]):
        if k < len(entry["curve"]) and entry["curve"][k] <= threshold:
            return int(entry["step"])
    return None


# ---- seed-level statistics ----------------------------------------------------------------------------
def _summary(values: list[float], null: float) -> dict[str, Any]:
    stats = mean_std(values)
    stats["interval"] = bootstrap_interval(values)
    test = wilcoxon_signed_rank([v - null for v in values])
    stats["wilcoxon_p"] = test["p_value"]
    low_high = stats["interval"]
    stats["significant"] = bool(
        test["p_value"] is not None
        and test["p_value"] < SIGNIFICANCE
        and low_high is not None
        and not low_high[0] <= null <= low_high[1]
    )
    return stats


def compare_arm(spec: Spec, records: dict, arm: str) -> dict[str, Any] | None:
    """Every statistic of arm against the reference arm, over the seeds both have."""
    reference = spec.reference
    seeds = [s for s in spec.seeds if (arm, s) in records and (reference, s) in records]
    if not seeds:
        return None
    pairs = []
    for seed in seeds:
        a, r = records[(arm, seed)], records[(reference, seed)]
        pair = {"seed": seed, **table5_pair(a["final_curve"]["mean"], r["final_curve"]["mean"])}
        d = a["n_dims"]
        speed = {}
        for threshold in spec.eval.thresholds:
            for label, k in (("d", d), ("2d", 2 * d)):
                speed[f"eps{threshold}_k{label}"] = {
                    "arm": steps_to_reach(a["eval_history"], k, threshold),
                    "ref": steps_to_reach(r["eval_history"], k, threshold),
                }
        pair["steps_to_error"] = speed
        pairs.append(pair)
    rel = [p["rel_min_error"] for p in pairs]
    defined = [float(p["shot_spare"]) for p in pairs if not p["censored"]]
    ranked = [float(p["shot_spare"]) if not p["censored"] else p["shot_spare_bound"] + 1.0 for p in pairs]
    spare_stats = mean_std(defined)
    spare_stats.update(
        n_defined=len(defined),
        n_censored=len(pairs) - len(defined),
        interval=bootstrap_interval(defined),
        wilcoxon_p=wilcoxon_signed_rank(ranked)["p_value"],
    )
    speed_summary = {}
    for key in pairs[0]["steps_to_error"]:
        steps = [p["steps_to_error"][key] for p in pairs]
        differences = [
            float(s["arm"] - s["ref"]) for s in steps if s["arm"] is not None and s["ref"] is not None
        ]
        speed_summary[key] = {
            "arm_reached": sum(s["arm"] is not None for s in steps),
            "ref_reached": sum(s["ref"] is not None for s in steps),
            "arm_median_steps": _censored_median([s["arm"] for s in steps]),
            "ref_median_steps": _censored_median([s["ref"] for s in steps]),
            "paired_difference": {**mean_std(differences), "interval": bootstrap_interval(differences)},
            "wilcoxon_p": wilcoxon_signed_rank(differences)["p_value"],
        }
    return {
        "arm": arm,
        "reference": reference,
        "seeds": seeds,
        "pairs": pairs,
        "rel_min_error": _summary(rel, 1.0),
        "log_rel_min_error": _summary([math.log(v) for v in rel], 0.0),
        "shot_spare": spare_stats,
        "meta_training_speed": speed_summary,
    }


def _censored_median(steps: list[int | None]) -> float | str | None:
    """Median with never-reached runs as +inf; "never" when the median itself is censored."""
    if not steps:
        return None
    median = statistics.median(math.inf if s is None else float(s) for s in steps)
    return "never" if math.isinf(median) else median


# ---- report ------------------------------------------------------------------------------------------
def _interval(stats: dict[str, Any], transform: Callable[[float], float] = lambda value: value) -> str:
    low_high = [transform(value) for value in stats.get("interval") or []]
    return f"[{table_number(low_high[0])}, {table_number(low_high[1])}]" if low_high else "n/a"


def _geometric(log_stats: dict[str, Any]) -> str:
    """A ratio's geometric mean and interval (exp of the log statistics): one outlier seed cannot dominate it."""
    if log_stats.get("mean") is None:
        return "n/a"
    star = " **significant**" if log_stats.get("significant") else ""
    return f"{table_number(math.exp(log_stats['mean']))} {_interval(log_stats, math.exp)}{star}"


def markdown(
    spec: Spec, records: dict, comparisons: list[dict[str, Any]], control: dict[str, Any] | None = None
) -> str:
    """results.md: Table 5 over seeds, meta-training speed, per-pair values (and the A/A section)."""
    lines = [
        f"# Experiment `{spec.name}`",
        "",
        f"Reference arm: `{spec.reference}`; runs with records: {len(records)} of {len(spec.runs())}; "
        f"commits: {', '.join(sorted({str(r.get('commit'))[:10] for r in records.values()}))}.",
        "",
        "| arm | pairs | Rel. Min. Error mean ± std [95% CI over seeds] (Wilcoxon p) | "
        "Rel. Min. Error median; geometric mean [95% CI] | "
        "Shot Spare mean ± std [95% CI] (defined / censored; Wilcoxon p) | min error arm vs ref (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        rel, spare = c["rel_min_error"], c["shot_spare"]
        star = " **significant**" if rel["significant"] else ""
        mins = (
            f"{table_number(sum(p['min_error_arm'] for p in c['pairs']) / len(c['pairs']))} vs "
            f"{table_number(sum(p['min_error_ref'] for p in c['pairs']) / len(c['pairs']))}"
        )
        censored = (
            f"{spare['n_censored']} censored (> k_max − argmin)" if spare["n_censored"] else "0 censored"
        )
        name = f"{c['arm']} (A/A control)" if c["arm"] == spec.control_arm else c["arm"]
        lines.append(
            f"| {name} | {len(c['pairs'])} | {table_number(rel['mean'])} ± {table_number(rel['std'])} {_interval(rel)} "
            f"(p={table_number(rel['wilcoxon_p'])}){star} | {table_number(rel['median'])}; {_geometric(c['log_rel_min_error'])} "
            f"| {table_number(spare['mean'])} ± {table_number(spare['std'])} "
            f"{_interval(spare)} ({spare['n_defined']} defined / {censored}; p={table_number(spare['wilcoxon_p'])}) "
            f"| {mins} |"
        )
    lines += [
        "",
        f"Shot Spare: an arm reaches the reference's minimum error at the first k where its error is at most "
        f"that minimum × (1 + {SHOT_SPARE_TOLERANCE:g}) (relative tolerance {SHOT_SPARE_TOLERANCE:g}); a pair "
        f"where it never does is censored.",
        "",
        "Meta-training speed: training steps until the eval error at k first reaches ε "
        "(median over seeds, never-reached runs counted as +∞; paired difference arm − ref over the "
        "seeds where both got there).",
        "",
        "| arm | ε, k | reached arm / ref | median steps arm vs ref | paired difference mean [95% CI] (p) |",
        "|---|---|---|---|---|",
    ]
    for c in comparisons:
        for key, s in c["meta_training_speed"].items():
            eps, k = key.split("_")
            lines.append(
                f"| {c['arm']} | {eps[3:]}, {k[1:]} | {s['arm_reached']} / {s['ref_reached']} | "
                f"{table_number(s['arm_median_steps'])} vs {table_number(s['ref_median_steps'])} | "
                f"{table_number(s['paired_difference']['mean'])} {_interval(s['paired_difference'])} "
                f"(p={table_number(s['wilcoxon_p'])}) |"
            )
    lines += ["", "Per pair (seed: Rel. Min. Error, Shot Spare):", ""]
    for c in comparisons:
        cells = [
            f"{p['seed']}: {p['rel_min_error']:.3f}, "
            + (f"> {p['shot_spare_bound']}" if p["censored"] else f"{p['shot_spare']}")
            for p in c["pairs"]
        ]
        lines.append(f"- {c['arm']}: " + "; ".join(cells))
    if control is not None:
        lines += aa_markdown(control)
    lines += ["", "![curves](curves.png)", "![paired](paired.png)", "![training](training.png)", ""]
    return "\n".join(lines)


def analyze(spec: Spec, plots: bool = True, expected: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write results.json, results.md (and plots) to the spec's analysis folder; returns results.md.
    ``expected``: each arm's resolved recipe (``experiment_records.expected_settings``), computed
    when not given."""
    records = load_records(spec, expected)
    if not records:
        raise ExperimentError(f"no records under {spec.records}; run the experiment first")
    check_pairing(spec, records)
    comparisons = [c for arm in spec.arms if arm != spec.reference if (c := compare_arm(spec, records, arm))]
    folder = spec.analysis
    folder.mkdir(parents=True, exist_ok=True)
    cost = sum(r.get("wall_seconds", 0.0) for r in records.values())
    result = {
        "experiment": spec.name,
        "reference": spec.reference,
        "runs": len(records),
        "cost_cpu_process_hours": cost / 3600,
        "commits": sorted({str(r.get("commit")) for r in records.values()}),
        "shot_spare_tolerance": SHOT_SPARE_TOLERANCE,
        "comparisons": comparisons,
    }
    control = against_control(spec, records, comparisons)
    if control is not None:
        result["against_control"] = control
    (folder / "results.json").write_text(json.dumps(result, indent=1))
    text = markdown(spec, records, comparisons, control)
    text += f"\nStudy cost: {len(records)} runs, {cost / 3600:.2f} process-hours of wall time in all.\n"
    (folder / "results.md").write_text(text)
    if plots and comparisons:
        from ..extras import is_available

        if is_available("matplotlib"):
            from ..experiment_plots import plot_experiment

            plot_experiment(spec, records, comparisons, folder)
        else:  # the tables and JSON are written; the plots need the plots extra
            print(
                "icl_conml: note: plots skipped: pip install 'icl_conml[plots]' for curves.png and the others"
            )
    return folder / "results.md"


__all__ = [
    "analyze",
    "compare_arm",
    "check_pairing",
    "table5_pair",
    "steps_to_reach",
    "wilcoxon_signed_rank",
    "bootstrap_interval",
]
