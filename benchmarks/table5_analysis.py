"""Analysis phase of ``table5.py``: evaluate the paired runs on one fixed eval set per task.

For every ConML variant that has runs for all requested seeds, compares it with plain ICL
(paired by seed) through ``icl_conml.evaluation.compare_models``, draws the seed-mean curves
next to least squares, and writes ``docs/results.md`` (tables) and ``docs/images/`` (plots).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from table5 import PLAN, REPO, RUNS, TASKS, VARIANTS, run_dir  # noqa: E402

from icl_conml.evaluation import (  # noqa: E402
    CompareArguments,
    EvaluationArguments,
    compare_models,
    evaluate_model,
    write_comparison,
)

EVAL_SEED = 20261129
N_PROMPTS = 1280
DOCS = REPO / "docs"


def eval_set(task: str) -> Path:
    """The fixed prompts every model of a task is evaluated on (built once)."""
    sparsity = dict(zip(TASKS[task][::2], TASKS[task][1::2], strict=True)).get("--sparsity")
    name = f"{task}_d5_n11_s{EVAL_SEED}"
    path = RUNS / "eval_sets" / name
    if not path.exists():
        command = [sys.executable, str(REPO / "data_scripts" / "make_eval_sets.py"), "--tasks", task]
        command += [
            "--n_dims",
            "5",
            "--n_points",
            "11",
            "--n_prompts",
            str(N_PROMPTS),
            "--seed",
            str(EVAL_SEED),
        ]
        command += ["--output_dir", str(RUNS / "eval_sets")] + (["--sparsity", sparsity] if sparsity else [])
        subprocess.run(command, check=True)
    return path


def training_summary(path: Path) -> dict[str, float]:
    """Last logged icl_loss / d_in / d_out and the wall time of one run."""
    history = json.loads((path / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "icl_loss" in entry]
    summary = {key: logged[-1][key] for key in ("icl_loss", "d_in", "d_out") if key in logged[-1]}
    wall = path / "wall_time.json"
    if wall.exists():
        summary["seconds"] = json.loads(wall.read_text())["seconds"]
    return summary


def overlay_plot(task: str, comparisons: dict[str, dict], least_squares: list[float], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ks = range(len(least_squares))
    first = next(iter(comparisons.values()))
    plain = first["curves"]["b_mean"]
    ax.plot(ks, plain["mean"], color="tab:blue", lw=2.2, label="plain ICL (mean over seeds)")
    ax.fill_between(ks, plain["low"], plain["high"], color="tab:blue", alpha=0.15)
    colors = ["tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    for color, (variant, result) in zip(colors, comparisons.items(), strict=False):
        curve = result["curves"]["a_mean"]
        ax.plot(ks, curve["mean"], color=color, lw=1.8, label=f"{variant} (mean over seeds)")
        ax.fill_between(ks, curve["low"], curve["high"], color=color, alpha=0.12)
    ax.plot(ks, least_squares, color="black", ls="--", lw=1.2, label="least squares")
    ax.set_xlabel("in-context examples k")
    ax.set_ylabel("normalised squared error")
    ax.set_ylim(0, 1.15)
    ax.set_title(f"{task}, d = 5")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def fmt_interval(entry: dict) -> str:
    return "—" if entry.get("low") is None else f"[{entry['low']:.3g}, {entry['high']:.3g}]"


def analyze(seeds: list[int]) -> None:
    (DOCS / "images").mkdir(parents=True, exist_ok=True)
    rows, details = [], {}
    for task in TASKS:
        data = eval_set(task)
        plain = [run_dir(task, "plain", s) for s in seeds]
        if not all((p / "model.safetensors").exists() for p in plain):
            print(f"[table5] {task}: plain runs missing, skipped")
            continue
        only_least_squares = EvaluationArguments(eval_set=str(data), baselines=["least_squares"])
        least_squares = evaluate_model(str(plain[0]), only_least_squares)["curves"]["least_squares"]
        comparisons = {}
        for variant in PLAN[task]:
            if variant == "plain":
                continue
            runs = [run_dir(task, variant, s) for s in seeds]
            available = [i for i, r in enumerate(runs) if (r / "model.safetensors").exists()]
            if not available:
                continue
            result = compare_models(
                [str(runs[i]) for i in available],
                [str(plain[i]) for i in available],
                CompareArguments(labels=[variant, "plain"], eval_set=str(data)),
            )
            write_comparison(result, RUNS / "compare" / task / variant)
            comparisons[variant] = result
            over, avg = result["over_seeds"], result["seed_averaged_curves"]
            rows.append(
                {
                    "task": task,
                    "variant": variant,
                    "seeds": [seeds[i] for i in available],
                    "rel_min_error": over["rel_min_error"],
                    "shot_spare": over["shot_spare"],
                    "seed_averaged": avg,
                    "min_error_variant": [min(c) for c in result["curves"]["a"]],
                    "min_error_plain": [min(c) for c in result["curves"]["b"]],
                    "conml_terms": [training_summary(runs[i]) for i in available],
                }
            )
        if "conml" in comparisons:  # the paper's setting against plain ICL
            overlay_plot(
                task, {"conml": comparisons["conml"]}, least_squares, DOCS / "images" / f"table5_{task}.png"
            )
        if len(comparisons) > 1:
            overlay_plot(task, comparisons, least_squares, DOCS / "images" / f"table5_{task}_variants.png")
        details[task] = {"least_squares": least_squares}
    (RUNS / "table5_summary.json").write_text(json.dumps({"rows": rows, "details": details}, indent=2))
    write_markdown(rows)


def write_markdown(rows: list[dict]) -> None:
    lines = [
        "| task | ConML variant | seeds | Rel. Min. Error (mean ± std) [95% CI] | Shot Spare (mean ± std; defined/pairs) [95% CI] "
        "| seed-averaged curves: Rel. Min. Error / Shot Spare | min error ConML vs plain, per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rel, spare, avg = row["rel_min_error"], row["shot_spare"], row["seed_averaged"]
        spare_text = "undefined" if spare["mean"] is None else f"{spare['mean']:.2f} ± {spare['std']:.2f}"
        avg_spare = "undefined" if avg["shot_spare"] is None else str(avg["shot_spare"])
        mins = ", ".join(
            f"{a:.3f} vs {b:.3f}"
            for a, b in zip(row["min_error_variant"], row["min_error_plain"], strict=True)
        )
        lines.append(
            f"| {row['task']} | {row['variant']} | {len(row['seeds'])} | {rel['mean']:.3f} ± {rel['std']:.3f} "
            f"{fmt_interval(rel['interval'])} | {spare_text} ({spare['n_defined']}/{len(row['seeds'])}) "
            f"{fmt_interval(spare['interval'])} | {avg['rel_min_error']:.3f} / {avg_spare} | {mins} |"
        )
    table = "\n".join(lines) + "\n"
    (RUNS / "table5.md").write_text(table)
    print(table)


if __name__ == "__main__":
    analyze([0, 1, 2])
    print("variants:", list(VARIANTS))
