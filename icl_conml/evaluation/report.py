"""Reports of an evaluation: Markdown tables, plots (matplotlib, optional) and the JSON files
(``results.json/.md``, ``curves.png``; ``compare.json/.md/.png``)."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..extras import is_available, require
from ..extras import message as missing_message
from ..plotting import FLOOR, error_axis, floored
from ..runs.files import write_bytes, write_text


def fmt(value: float | None) -> str:
    """A number in a table: 3 significant digits, ``—`` for none or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.3e}"


def results_table(results: dict[str, Any]) -> str:
    """Markdown: error at each k per estimator, then the needed context lengths."""
    names = list(results["curves"])
    meta = results["metadata"]
    lines = [
        f"Error at k (normalised squared error, mean over {meta['n_prompts']} prompts; "
        f"task {meta['task']}, d={meta['n_dims']}"
        + (f", ood {meta['ood']}" if meta.get("ood") else "")
        + "; 95% bootstrap intervals in results.json)",
        "",
        "| k | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for k in results["k"]:
        lines.append(f"| {k} | " + " | ".join(fmt(results["curves"][name][k]) for name in names) + " |")
    thresholds = results["thresholds"]
    within = thresholds["within_best"]
    lines += [
        "",
        "Needed context length (smallest k with error ≤ threshold; — = not within the prompt)",
        "",
        "| threshold | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        f"| ≤ {fmt(thresholds['absolute'])} | "
        + " | ".join(fmt(results["needed_context_length"]["absolute"][n]) for n in names)
        + " |",
    ]
    if within is not None:
        lines.append(
            f"| ≤ {fmt(within)} (best {thresholds['best_reference']} + {results['metadata']['relative_tolerance']:.0%}) | "
            + " | ".join(fmt(results["needed_context_length"]["within_best"][n]) for n in names)
            + " |"
        )
    return "\n".join(lines) + "\n"


def comparison_table(result: dict[str, Any]) -> str:
    """Markdown: Table 5 over seeds and on the seed-averaged curves, then one row per pair."""
    a, b = result["metadata"]["labels"]
    over = result["over_seeds"]
    avg = result["seed_averaged_curves"]

    def interval(entry: dict[str, Any]) -> str:
        return f"[{fmt(entry['low'])}, {fmt(entry['high'])}]"

    def mean_std(entry: dict[str, Any]) -> str:
        if entry["mean"] is None:
            return "—"
        return f"{entry['mean']:.3g} ± {'n/a' if entry['std'] is None else format(entry['std'], '.3g')}"

    spare = over["shot_spare"]
    lines = [
        f"{a} against {b} ({over['n_pairs']} pair(s) by seed; {result['metadata']['task']}, "
        f"d={result['metadata']['n_dims']}, {result['metadata']['n_prompts']} prompts)",
        "",
        "| metric | mean ± std over seeds | 95% bootstrap interval | seed-averaged curves |",
        "|---|---|---|---|",
        f"| Rel. Min. Error (min {a} / min {b}) | {mean_std(over['rel_min_error'])} | "
        f"{interval(over['rel_min_error']['interval'])} | {fmt(avg['rel_min_error'])} {interval(avg['rel_min_error_interval'])} |",
        f"| Shot Spare (first k {a} ≤ min {b} − argmin {b}) | {mean_std(spare)} "
        f"(defined for {spare['n_defined']}/{over['n_pairs']}; undefined: {spare['n_undefined']}) | "
        f"{interval(spare['interval'])} | {fmt(avg['shot_spare'])} {interval(avg['shot_spare_interval'])} |",
        "",
        "| pair | Rel. Min. Error | Shot Spare |",
        "|---|---|---|",
    ]
    for pair in result["pairs"]:
        shot = (
            "undefined (never reaches B's minimum)" if pair["shot_spare"] is None else str(pair["shot_spare"])
        )
        lines.append(f"| {pair['pair']} | {fmt(pair['rel_min_error'])} | {shot} |")
    return "\n".join(lines) + "\n"


def plot_curves(
    series: dict[str, dict[str, list[float]]],
    path: Path,
    title: str,
    log_scale: bool = False,
    styles: dict[str, dict[str, Any]] | None = None,
    band_note: str = "",
) -> None:
    """Error against k with bands; ``series`` maps a label to mean/low/high lists.

    The title's second line says what the bands are (``band_note``). The axis shows every curve
    whole (no curve is cut off at the top); on a log axis errors below ``plotting.FLOOR`` (exact
    estimators reach ~1e-14: rounding) are drawn at it. Needs matplotlib (``pip install
    'icl_conml[plots]'``); the CLI skips plots, with a note, without it.
    """
    matplotlib = require("matplotlib", f"the plot {Path(path).name}")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    _draw_series(axes, series, styles, log_scale)
    axes.set_xlabel("in-context examples k")
    axes.set_ylabel("normalised squared error")
    axes.set_title(title + (f"\n{band_note}" if band_note else ""), fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)


def _draw_series(
    axes, series: dict[str, dict[str, list[float]]], styles: dict[str, dict[str, Any]] | None, log_scale: bool
) -> None:
    """The curves (and their bands) on ``axes``, with the error axis scaled to show them whole."""
    values: list[float] = []
    for label, curve in series.items():
        style = (styles or {}).get(label, {})
        k = list(range(len(curve["mean"])))
        mean = floored(curve["mean"]) if log_scale else curve["mean"]
        line = axes.plot(k, mean, label=label, **style)[0]
        values += mean
        if "low" in curve:
            low, high = (floored(curve[key]) if log_scale else curve[key] for key in ("low", "high"))
            axes.fill_between(k, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            values += high
    if log_scale and any(v < FLOOR for c in series.values() for v in c["mean"]):
        axes.text(0.99, 0.01, f"errors below {FLOOR:g} (rounding) are drawn at {FLOOR:g}", fontsize=7,
                  ha="right", va="bottom", transform=axes.transAxes, color="dimgray")  # fmt: skip
    if not error_axis(axes, values, log=log_scale):
        top = max((v for v in values if math.isfinite(v)), default=1.0)
        axes.set_ylim(bottom=0, top=top * 1.05 if top > 0 else 1)


def short_name(model: str) -> str:
    """A model's name for a plot title: a local path's last folder(s), a Hub id as it is."""
    path = Path(model)
    if not (path.is_absolute() or model.startswith(".") or path.exists()):
        return model  # a Hub id (user/name) or an in-memory model's name
    if path.name.startswith("checkpoint-"):
        return f"{path.parent.name}/{path.name}"
    return path.name or model


def can_plot(name: str) -> bool:
    """Whether matplotlib is installed; if not, say on stderr which plot is skipped and how to get it."""
    if is_available("matplotlib"):
        return True
    print(
        f"icl_conml: note: {name} not written: {missing_message('matplotlib', 'plotting')}", file=sys.stderr
    )
    return False


def write_results(results: dict[str, Any], output_dir: str | Path, log_scale: bool = False) -> Path:
    """results.json, results.md and curves.png in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")  # atomic: never half a file
    write_text(out / "results.md", results_table(results))
    meta = results["metadata"]
    series = {
        name: {"mean": curve, **results["intervals"][name]} for name, curve in results["curves"].items()
    }
    styles = {"model": {"linewidth": 2.5, "color": "black"}}
    title = f"{short_name(str(meta['model']))}: {meta['task']}, d={meta['n_dims']}" + (
        f", {meta['ood']}" if meta.get("ood") else ""
    )
    note = f"mean over {meta['n_prompts']} prompts; bands: 95% bootstrap intervals over the prompts"
    if can_plot("curves.png"):
        plot_curves(series, out / "curves.png", title, log_scale, styles, band_note=note)
    return out


def write_comparison(result: dict[str, Any], output_dir: str | Path, log_scale: bool = False) -> Path:
    """compare.json, compare.md and compare.png (``plot_comparison``)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "compare.json", json.dumps(result, indent=2) + "\n")  # atomic: never half a file
    write_text(out / "compare.md", comparison_table(result))
    if can_plot("compare.png"):
        plot_comparison(result, out / "compare.png", log_scale)
    return out


def plot_comparison(result: dict[str, Any], path: Path, log_scale: bool = False) -> None:
    """Two panels: left, every model's error curve and each set's mean over seeds (bands: 95%
    bootstrap over prompts); right, the paired ratio A_i / B_i at each k for every seed and for
    the seed means, against 1 (no difference), titled with the Rel. Min. Error and its interval.

    Two curves that look alike on the left can differ consistently: the right panel and its
    title show the paired comparison that ``compare.md`` reports.
    """
    matplotlib = require("matplotlib", f"the plot {Path(path).name}")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = result["metadata"]["labels"]
    meta, curves = result["metadata"], result["curves"]
    series: dict[str, dict[str, list[float]]] = {
        f"{a} (mean)": curves["a_mean"],
        f"{b} (mean)": curves["b_mean"],
    }
    styles: dict[str, dict[str, Any]] = {
        f"{a} (mean)": {"color": "tab:red", "linewidth": 2.5},
        f"{b} (mean)": {"color": "tab:blue", "linewidth": 2.5, "linestyle": "--"},
    }
    if len(curves["a"]) > 1:
        for label, color, seeds in ((a, "tab:red", curves["a"]), (b, "tab:blue", curves["b"])):
            for i, curve in enumerate(seeds):
                name = f"{label}, each seed" if i == 0 else f"_{label} seed {i}"  # one legend entry per set
                series[name] = {"mean": curve}
                styles[name] = {"color": color, "linewidth": 0.8, "alpha": 0.5, "linestyle": ":"}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120)
    _draw_series(left, series, styles, log_scale)
    left.set_xlabel("in-context examples k")
    left.set_ylabel("normalised squared error")
    left.set_title(
        f"{a} vs {b}: {meta['task']}, d={meta['n_dims']}, {meta['n_prompts']} prompts\n"
        f"bands: 95% bootstrap intervals over the prompts",
        fontsize=9,
    )
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    ratios: list[float] = []
    for i, (curve_a, curve_b) in enumerate(zip(curves["a"], curves["b"], strict=True)):
        ratio = [x / y if y > 0 else math.nan for x, y in zip(curve_a, curve_b, strict=True)]
        right.plot(ratio, color="gray", linewidth=0.8, alpha=0.7, label="one pair (seed)" if i == 0 else None)
        ratios += ratio
    mean_ratio = [
        x / y if y > 0 else math.nan
        for x, y in zip(curves["a_mean"]["mean"], curves["b_mean"]["mean"], strict=True)
    ]
    right.plot(mean_ratio, color="black", linewidth=2.2, label=f"mean {a} / mean {b}")
    right.axhline(1.0, color="tab:blue", linewidth=0.8, linestyle="--", label="no difference")
    error_axis(right, [*ratios, *mean_ratio, 1.0])
    right.set_xlabel("in-context examples k")
    right.set_ylabel(f"error ratio {a} / {b} (below 1: {a} better)")
    right.set_title(f"paired by seed\n{paired_summary(result)}", fontsize=9)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)


def _save(figure, path: str | Path) -> None:
    """Save and close ``figure``; the file is written atomically (a full disk leaves no half image)."""
    import matplotlib.pyplot as plt

    image = io.BytesIO()
    figure.savefig(image, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(figure)
    write_bytes(path, image.getvalue())


def paired_summary(result: dict[str, Any]) -> str:
    """The paired comparison in one line (compare.png's right title): the Rel. Min. Error over
    the pairs and its 95% bootstrap interval, as ``compare.md`` reports them."""
    a, b = result["metadata"]["labels"]
    rel = (result.get("over_seeds") or {}).get("rel_min_error") or {}
    interval = rel.get("interval") or {}
    summary = f"Rel. Min. Error (min {a} / min {b})"
    if rel.get("mean") is None:
        return summary + ": n/a"
    summary += f": {rel['mean']:.4g} over {len(result['curves']['a'])} pair(s)"
    if interval.get("low") is not None:
        summary += f", 95% interval [{interval['low']:.4g}, {interval['high']:.4g}]"
    return summary
