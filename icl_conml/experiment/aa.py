"""The A/A control of a study: how far float rounding alone moves a run, and whether each arm
moves runs further than that.

The control arm (``control_arm`` in the spec) repeats the reference arm's settings with the
initial weights moved by rounding-level noise (``init_perturbation_std``, e.g. 1e-7). Its
per-seed Rel. Min. Error against the reference is the noise floor: what a rerun of the
reference would show. Each other arm is compared with it seed by seed (all three runs of a
seed share initial weights, up to the perturbation, and training prompts), with two exact
Wilcoxon signed-rank tests on the paired per-seed values:

- location: log RME_arm − log RME_aa (= log of the arm's minimum error over the A/A run's): is
  the arm better or worse than a rerun of the reference?
- dispersion: |log RME_arm| − |log RME_aa|: does the arm move runs further from the reference,
  in either direction, than rounding does? (At this scale a run's outcome can flip on rounding,
  so an arm could change outcomes without shifting their median.)

An arm is *distinguishable from the A/A arm* when either p is below 0.05 / 2 (Bonferroni over
the two tests). Steps-to-error get the same two tests on the paired differences from the
reference's steps, a run that never got there counted at one evaluation past the end of training
(worse than any step it could have reached; the same rule as a censored Shot Spare).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..evaluation.statistics import seed_statistics, wilcoxon_signed_rank

if TYPE_CHECKING:
    from .spec import Spec

#: Family-wise level of the two tests per arm (location, dispersion), Bonferroni-corrected.
FAMILY_SIGNIFICANCE = 0.05
TESTS_PER_ARM = 2


def _test(differences: list[float]) -> float | None:
    return wilcoxon_signed_rank(differences)["p_value"]


def _distinguishable(*p_values: float | None) -> bool:
    return any(p is not None and p < FAMILY_SIGNIFICANCE / TESTS_PER_ARM for p in p_values)


def _steps_or_bound(steps: int | None, bound: int) -> float:
    return float(bound if steps is None else steps)


def against_control(
    spec: Spec, records: dict[tuple[str, int], dict[str, Any]], comparisons: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Each arm against the A/A control, per seed and over seeds; None without a control arm."""
    control = spec.control_arm
    if control is None:
        return None
    by_arm = {c["arm"]: c for c in comparisons}
    floor = by_arm.get(control)
    result: dict[str, Any] = {"control": control, "reference": spec.reference, "arms": []}
    if floor is None:
        return result
    floor_pairs = {p["seed"]: p for p in floor["pairs"]}
    result["floor"] = {
        "rel_min_error": seed_statistics([p["rel_min_error"] for p in floor["pairs"]]),
        "abs_log_rel_min_error": seed_statistics([abs(math.log(p["rel_min_error"])) for p in floor["pairs"]]),
    }
    for c in comparisons:
        if c["arm"] == control:
            continue
        pairs = [(p, floor_pairs[p["seed"]]) for p in c["pairs"] if p["seed"] in floor_pairs]
        if not pairs:
            continue
        log_arm = [math.log(p["rel_min_error"]) for p, _ in pairs]
        log_aa = [math.log(q["rel_min_error"]) for _, q in pairs]
        location = _test([a - b for a, b in zip(log_arm, log_aa, strict=True)])
        dispersion = _test([abs(a) - abs(b) for a, b in zip(log_arm, log_aa, strict=True)])
        speed = {}
        for key in c["meta_training_speed"]:
            arm_delta, aa_delta, flips_arm, flips_aa = [], [], 0, 0
            for p, q in pairs:
                bound = int(records[(c["arm"], p["seed"])].get("max_steps") or 0) + spec.eval.every
                ref = _steps_or_bound(p["steps_to_error"][key]["ref"], bound)
                arm_delta.append(_steps_or_bound(p["steps_to_error"][key]["arm"], bound) - ref)
                aa_delta.append(_steps_or_bound(q["steps_to_error"][key]["arm"], bound) - ref)
                reached_ref = p["steps_to_error"][key]["ref"] is not None
                flips_arm += (p["steps_to_error"][key]["arm"] is not None) != reached_ref
                flips_aa += (q["steps_to_error"][key]["arm"] is not None) != reached_ref
            speed_location = _test([a - b for a, b in zip(arm_delta, aa_delta, strict=True)])
            speed_dispersion = _test([abs(a) - abs(b) for a, b in zip(arm_delta, aa_delta, strict=True)])
            speed[key] = {
                "arm_delta_steps": arm_delta,
                "aa_delta_steps": aa_delta,
                "arm_median_abs_delta": seed_statistics([abs(v) for v in arm_delta])["median"],
                "aa_median_abs_delta": seed_statistics([abs(v) for v in aa_delta])["median"],
                "arm_flips": flips_arm,
                "aa_flips": flips_aa,
                "location_p": speed_location,
                "dispersion_p": speed_dispersion,
                "distinguishable": _distinguishable(speed_location, speed_dispersion),
            }
        result["arms"].append(
            {
                "arm": c["arm"],
                "seeds": [p["seed"] for p, _ in pairs],
                "rel_min_error_arm": [p["rel_min_error"] for p, _ in pairs],
                "rel_min_error_aa": [q["rel_min_error"] for _, q in pairs],
                "arm_over_aa_geometric_mean": math.exp(
                    sum(a - b for a, b in zip(log_arm, log_aa, strict=True)) / len(pairs)
                ),
                "median_abs_log_rme_arm": seed_statistics([abs(v) for v in log_arm])["median"],
                "median_abs_log_rme_aa": seed_statistics([abs(v) for v in log_aa])["median"],
                "location_p": location,
                "dispersion_p": dispersion,
                "distinguishable": _distinguishable(location, dispersion),
                "meta_training_speed": speed,
            }
        )
    return result


def table_number(value: Any, digits: int = 3) -> str:
    """A value in the study's Markdown tables: ``digits`` significant digits below 1000, whole
    numbers above, "n/a" for none (the experiment analysis uses it too)."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _verdict(entry: dict[str, Any]) -> str:
    return "**yes**" if entry["distinguishable"] else "no"


def markdown(result: dict[str, Any]) -> list[str]:
    """The report's A/A section: the noise floor, then each arm against it (two short tables)."""
    control, reference = result["control"], result["reference"]
    lines = ["", f"## Against the A/A control `{control}` (the noise floor)", ""]
    if "floor" not in result:
        return [*lines, f"No pair of `{control}` and `{reference}` has records yet.", ""]
    floor = result["floor"]
    lines += [
        f"`{control}` repeats `{reference}` with rounding-level noise on its initial weights: its Rel. Min. "
        f"Error against `{reference}` is what rounding alone does (over {floor['rel_min_error']['n']} seeds: "
        f"median {table_number(floor['rel_min_error']['median'])}, median |log RME| "
        f"{table_number(floor['abs_log_rel_min_error']['median'])}). Each arm is compared with it seed by seed by two "
        f"exact Wilcoxon signed-rank tests: location on log RME_arm − log RME_aa, dispersion on |log RME_arm| − "
        f"|log RME_aa|; distinguishable from A/A when either p < {FAMILY_SIGNIFICANCE / TESTS_PER_ARM:g} "
        f"(Bonferroni over the two tests).",
        "",
        "| arm | seeds | RME arm / A/A (geometric mean) | median abs(log RME): arm vs A/A | location p | "
        "dispersion p | distinguishable from A/A |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in result["arms"]:
        lines.append(
            f"| {entry['arm']} | {len(entry['seeds'])} | {table_number(entry['arm_over_aa_geometric_mean'])} | "
            f"{table_number(entry['median_abs_log_rme_arm'])} vs {table_number(entry['median_abs_log_rme_aa'])} | "
            f"{table_number(entry['location_p'])} | {table_number(entry['dispersion_p'])} | {_verdict(entry)} |"
        )
    lines += [
        "",
        f"Steps to reach ε at k against `{reference}`'s (a run that never got there counts as one evaluation "
        f"past the end): how many seeds flip between reaching and not reaching it, the median abs(Δ steps), "
        f"and the same two tests.",
        "",
        "| arm | ε, k | flips arm vs A/A | median abs(Δ steps) arm vs A/A | location p | dispersion p | "
        "distinguishable |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in result["arms"]:
        for key, s in entry["meta_training_speed"].items():
            eps, k = key.split("_")
            lines.append(
                f"| {entry['arm']} | {eps[3:]}, {k[1:]} | {s['arm_flips']} vs {s['aa_flips']} | "
                f"{table_number(s['arm_median_abs_delta'])} vs {table_number(s['aa_median_abs_delta'])} | "
                f"{table_number(s['location_p'])} | {table_number(s['dispersion_p'])} | {_verdict(s)} |"
            )
    lines += ["", "Per seed (Rel. Min. Error against the reference: arm vs A/A):", ""]
    for entry in result["arms"]:
        cells = [
            f"{seed}: {arm:.3f} vs {aa:.3f}"
            for seed, arm, aa in zip(
                entry["seeds"], entry["rel_min_error_arm"], entry["rel_min_error_aa"], strict=True
            )
        ]
        lines.append(f"- {entry['arm']}: " + "; ".join(cells))
    return [*lines, ""]
