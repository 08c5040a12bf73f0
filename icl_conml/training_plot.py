"""``training_curves.png``: one run's training loss and normalised error against the step.

Written into ``output_dir`` when a run ends (``callbacks.TrainingCurvesPlot``) from the Trainer's
``log_history``: left, the training loss (and the ICL part of it when ConML adds a term); right,
the error on the evaluation's scale: ``icl_error`` (training prompts, every k) and, when the run
evaluated during training, ``eval_error_at_d`` / ``eval_error_at_2d`` (the fixed eval prompts), on
the project's error axis (``plotting.error_axis``: log with plain labels, linear inside a decade).
matplotlib is optional: without it the run logs one line saying so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .extras import is_available
from .extras import message as missing_message
from .plotting import error_axis

logger = logging.getLogger("icl_conml")

PLOT_NAME = "training_curves.png"

#: (log key, legend label) of each panel.
LOSS_SERIES = (("loss", "training loss"), ("icl_loss", "ICL part of the loss"))
ERROR_SERIES = (
    ("icl_error", "training prompts, mean over k"),
    ("eval_error_at_d", "eval prompts, k = d"),
    ("eval_error_at_2d", "eval prompts, k = 2d"),
)


def series(log_history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The steps and values of ``key`` in ``log_history`` (entries without it are skipped)."""
    points = [(entry["step"], float(entry[key])) for entry in log_history if key in entry and "step" in entry]
    return [step for step, _ in points], [value for _, value in points]


def write_training_curves(log_history: list[dict[str, Any]], output_dir: str | Path) -> Path | None:
    """``output_dir/training_curves.png``; ``None`` (with one log line) without matplotlib or logs."""
    if not is_available("matplotlib"):
        logger.info("%s not written: %s", PLOT_NAME, missing_message("matplotlib", "the training-curve plot"))
        return None
    if not series(log_history, "loss")[0]:
        return None  # nothing logged (a run shorter than logging_steps)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = training_figure(log_history)
    path = Path(output_dir) / PLOT_NAME
    figure.savefig(path)
    plt.close(figure)
    return path


def training_figure(log_history: list[dict[str, Any]]):
    """The figure of ``training_curves.png`` (a matplotlib ``Figure``; the caller closes it)."""
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    loss_steps, loss = series(log_history, "loss")
    icl_steps, icl = series(log_history, "icl_loss")
    left.plot(loss_steps, loss, label=LOSS_SERIES[0][1], color="black")
    if icl and icl != loss:  # with ConML the loss has a second term
        left.plot(icl_steps, icl, label=LOSS_SERIES[1][1], color="tab:gray", linestyle="--")
    left.set_title("training loss (squared error, not normalised)", fontsize=10)
    for (key, label), color in zip(ERROR_SERIES, ("black", "tab:blue", "tab:red"), strict=True):
        steps, values = series(log_history, key)
        if steps:
            right.plot(steps, values, label=label, color=color, marker="o" if len(steps) < 30 else None,
                       markersize=3)  # fmt: skip
    right.set_title("normalised error (as the evaluation reports it; 1 = predicting 0)", fontsize=10)
    error_axis(right, [value for line in right.get_lines() for value in line.get_ydata()])
    for axes in (left, right):
        axes.set_xlabel("optimizer step")
        axes.grid(alpha=0.3)
        if axes.get_lines():
            axes.legend(fontsize=8)
    figure.tight_layout()
    return figure
