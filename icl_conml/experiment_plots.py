"""The plots of an experiment's analysis: ``curves.png``, ``paired.png`` and ``training.png``.

Each says what it shows in its title and axis labels, so that a reader of ``results.md`` needs
no code to read it:

- ``curves.png``: the error at each k at the end of training, the mean over seeds per arm, with
  a 95% bootstrap interval of that mean over the seeds (never below zero, unlike mean ± 1.96 SE);
- ``paired.png``: each seed's Rel. Min. Error (arm against the reference arm), and per arm the
  geometric mean with its 95% interval (the interval ``results.md`` reports);
- ``training.png``: the eval error at k = d against the training step, mean over seeds with
  the same bootstrap band.

Arms whose curves are identical (the same numbers, e.g. two settings that train the same model)
would hide each other: they are drawn with distinct line styles and markers and their label
says which arm they equal. Error axes are logarithmic with plain labels (``plotting.error_axis``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .evaluation.statistics import resampled_mean_interval
from .plotting import error_axis, floored

#: Line styles and markers, one per arm in turn, so that lines on top of each other stay visible.
STYLES = (("-", None), ("--", "o"), ("-.", "s"), (":", "^"), ((0, (5, 1)), "D"), ((0, (1, 1)), "v"))
BAND = "95% bootstrap interval of the mean over seeds"


def seed_band(curves: list[list[float]], samples: int = 1000, seed: int = 0) -> tuple[list, list, list]:
    """Mean over seeds of ``curves`` (S, K) and the percentile 95% bootstrap interval of that mean."""
    data = torch.tensor(curves, dtype=torch.float64)
    mean = data.mean(0)
    if data.shape[0] < 2:
        return mean.tolist(), mean.tolist(), mean.tolist()
    low, high = resampled_mean_interval(data, samples, seed)
    return mean.tolist(), low.tolist(), high.tolist()


def same_as(curves: dict[str, list[list[float]]]) -> dict[str, str]:
    """Arm → the earlier arm whose per-seed curves are the same numbers (arms that would hide)."""
    equal: dict[str, str] = {}
    names = list(curves)
    for i, arm in enumerate(names):
        for other in names[:i]:
            if other not in equal and curves[arm] == curves[other]:
                equal[arm] = other
                break
    return equal


def _plot_arms(axes, xs_by_arm: dict[str, list], curves: dict[str, list[list[float]]]) -> list[float]:
    """Mean lines with bands, one style per arm; returns every plotted value (for the axis)."""
    equal = same_as(curves)
    values: list[float] = []
    for i, (arm, arm_curves) in enumerate(curves.items()):
        linestyle, marker = STYLES[i % len(STYLES)]
        mean, low, high = (floored(v) for v in seed_band(arm_curves))
        label = f"{arm} ({len(arm_curves)} seeds)" + (f", = {equal[arm]}" if arm in equal else "")
        line = axes.plot(xs_by_arm[arm], mean, label=label, linestyle=linestyle, marker=marker, markersize=3.5,
                         markevery=max(1, len(mean) // 12))[0]  # fmt: skip
        axes.fill_between(xs_by_arm[arm], low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        values += mean + low + high
    return values


def plot_experiment(spec, records: dict, comparisons: list[dict[str, Any]], folder: Path) -> None:
    """Write ``curves.png``, ``paired.png`` and ``training.png`` into ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = {
        arm: [r["final_curve"]["mean"] for (a, _), r in sorted(records.items()) if a == arm]
        for arm in spec.arms
    }
    final = {arm: curves for arm, curves in final.items() if curves}
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    values = _plot_arms(axes, {arm: list(range(len(c[0]))) for arm, c in final.items()}, final)
    error_axis(axes, values)
    axes.set(xlabel="in-context examples k", ylabel="normalised error at k (eval prompts)")
    axes.set_title(f"{spec.name}: error at the end of training\nmean over seeds; bands: {BAND}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "curves.png", dpi=110)
    plt.close(figure)

    _plot_pairs(plt, spec, comparisons, folder / "paired.png")

    histories: dict[str, list[list[float]]] = {}
    steps_by_arm: dict[str, list[int]] = {}
    for arm in spec.arms:
        runs = [r for (a, _), r in sorted(records.items()) if a == arm and r["eval_history"]]
        if not runs:
            continue
        d = runs[0]["n_dims"]
        curves = [[e["curve"][min(d, len(e["curve"]) - 1)] for e in r["eval_history"]] for r in runs]
        if len({len(c) for c in curves}) != 1:
            continue
        histories[arm] = curves
        steps_by_arm[arm] = [e["step"] for e in runs[0]["eval_history"]]
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    values = _plot_arms(axes, steps_by_arm, histories) if histories else []
    error_axis(axes, values)
    axes.set(xlabel="training step", ylabel="eval error at k = d")
    axes.set_title(f"{spec.name}: meta-training speed\nmean over seeds; bands: {BAND}", fontsize=9)
    axes.grid(alpha=0.3)
    if histories:
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "training.png", dpi=110)
    plt.close(figure)


def _plot_pairs(plt, spec, comparisons: list[dict[str, Any]], path: Path) -> None:
    """Per-seed Rel. Min. Error of each arm, with its geometric mean and 95% interval."""
    figure, axes = plt.subplots(figsize=(max(4.5, 1.2 * len(comparisons) + 2.5), 3.8))
    values: list[float] = [1.0]
    for i, c in enumerate(comparisons):
        ratios = [p["rel_min_error"] for p in c["pairs"]]
        count = len(ratios)
        jitter = [i + 0.25 * ((j + 0.5) / count - 0.5) for j in range(count)]  # side by side, not on top
        axes.scatter(jitter, ratios, s=18, alpha=0.75, color="tab:blue", label="one seed" if i == 0 else None)
        log = c.get("log_rel_min_error") or {}
        if log.get("mean") is not None:
            centre = math.exp(log["mean"])
            interval = log.get("interval")
            low, high = (math.exp(v) for v in interval) if interval else (centre, centre)
            axes.errorbar([i + 0.22], [centre], yerr=[[centre - low], [high - centre]], fmt="D", color="black",
                          markersize=5, capsize=3, label="geometric mean, 95% interval" if i == 0 else None)  # fmt: skip
            values += [low, high]
        values += ratios
    axes.axhline(1.0, color="gray", linewidth=0.8, linestyle="--", label="no difference")
    error_axis(axes, values)
    axes.set_xticks(range(len(comparisons)), [c["arm"] for c in comparisons], rotation=20, fontsize=8)
    axes.set_xlim(-0.6, len(comparisons) - 0.4)
    axes.set_ylabel(f"Rel. Min. Error vs {spec.reference}\n(min over k, arm / {spec.reference})", fontsize=8)
    axes.set_title(f"{spec.name}: per-seed pairs (below 1: the arm reaches a lower error)", fontsize=9)
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
