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
        return "—" if entry["mean"] is None else f"{entry['mean']:.3g} ± {entry['std']:.3g}"

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
) -> None:
    """Error against k with bootstrap bands; ``series`` maps a label to mean/low/high lists.

    Needs matplotlib (``pip install 'icl_conml[plots]'``); the CLI skips plots, with a note, without it.
    """
    matplotlib = require("matplotlib", f"the plot {Path(path).name}")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, values in series.items():
        style = (styles or {}).get(label, {})
        k = list(range(len(values["mean"])))
        line = axes.plot(k, values["mean"], label=label, **style)[0]
        if "low" in values:
            axes.fill_between(
                k, values["low"], values["high"], color=line.get_color(), alpha=0.2, linewidth=0
            )
    axes.set_xlabel("in-context examples k")
    axes.set_ylabel("normalised squared error")
    if log_scale:
        axes.set_yscale("log")
    else:
        top = max(max(v["mean"]) for v in series.values())
        axes.set_ylim(bottom=0, top=min(top, 2.0) * 1.05 if top > 0 else 1)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(figure)
    write_bytes(path, image.getvalue())  # atomic: a full disk leaves no half-written image


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
    title = f"{meta['model']}: {meta['task']}, d={meta['n_dims']}" + (
        f", {meta['ood']}" if meta.get("ood") else ""
    )
    if can_plot("curves.png"):
        plot_curves(series, out / "curves.png", title, log_scale, styles)
    return out


def write_comparison(result: dict[str, Any], output_dir: str | Path, log_scale: bool = False) -> Path:
    """compare.json, compare.md and compare.png (every model's curve, seed means with bands)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "compare.json", json.dumps(result, indent=2) + "\n")  # atomic: never half a file
    write_text(out / "compare.md", comparison_table(result))
    a, b = result["metadata"]["labels"]
    curves = result["curves"]
    series: dict[str, dict[str, list[float]]] = {
        f"{a} (mean)": curves["a_mean"],
        f"{b} (mean)": curves["b_mean"],
    }
    styles: dict[str, dict[str, Any]] = {
        f"{a} (mean)": {"color": "tab:red", "linewidth": 2.5},
        f"{b} (mean)": {"color": "tab:blue", "linewidth": 2.5},
    }
    if len(curves["a"]) > 1:
        for label, color, seeds in ((a, "tab:red", curves["a"]), (b, "tab:blue", curves["b"])):
            for i, curve in enumerate(seeds):
                series[f"{label} seed {i}"] = {"mean": curve}
                styles[f"{label} seed {i}"] = {
                    "color": color,
                    "linewidth": 0.8,
                    "alpha": 0.5,
                    "linestyle": "--",
                }
    meta = result["metadata"]
    if can_plot("compare.png"):
        title = f"{a} vs {b}: {meta['task']}, d={meta['n_dims']}"
        plot_curves(series, out / "compare.png", title, log_scale, styles)
    return out
