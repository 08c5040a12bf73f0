"""The plots a reader sees: readable error axes, bands that say what they are, nothing cut off,
identical arms that stay visible, a comparison plot that shows the paired difference."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from icl_conml.evaluation.compare import compare_errors  # noqa: E402
from icl_conml.evaluation.report import _draw_series, paired_summary, plot_comparison, short_name  # noqa: E402
from icl_conml.experiment_plots import _plot_arms, same_as, seed_band  # noqa: E402
from icl_conml.plotting import FLOOR, error_axis  # noqa: E402


def _labels(axes) -> list[str]:
    axes.figure.canvas.draw()
    low, high = axes.get_ylim()
    return [
        t.get_text() for t in axes.get_yticklabels() if t.get_text() and low <= t.get_position()[1] <= high
    ]


def test_a_log_error_axis_has_plain_labels_and_a_narrow_range_is_linear():
    figure, axes = plt.subplots()
    axes.plot([0, 1, 2], [0.03, 0.4, 20.0])
    assert error_axis(axes, [0.03, 0.4, 20.0])
    labels = _labels(axes)
    assert {"0.1", "1", "10"} <= set(labels) and not any(
        "10^" in t or "times" in t or "×" in t for t in labels
    )
    figure, axes = plt.subplots()
    axes.plot([0, 1], [0.9, 1.3])  # inside one decade: the old axis read "1×10⁰" at every tick
    assert not error_axis(axes, [0.9, 1.3])
    labels = _labels(axes)
    assert len(set(labels)) == len(labels) >= 3 and all(float(t) for t in labels)
    plt.close("all")


def test_seed_bands_never_go_below_zero_and_identical_arms_are_named():
    curves = [[1.0, 0.5, 0.01], [1.0, 0.4, 0.9], [1.0, 0.6, 0.02]]  # one outlier seed at the last k
    mean, low, high = seed_band(curves)
    for k in range(3):
        column = [c[k] for c in curves]
        assert min(column) <= low[k] <= mean[k] <= high[k] <= max(column)
    arms = {"plain": curves, "late": [list(c) for c in curves], "other": [[1.0, 0.3, 0.2]] * 3}
    assert same_as(arms) == {"late": "plain"}
    figure, axes = plt.subplots()
    _plot_arms(axes, {arm: [0, 1, 2] for arm in arms}, arms)
    lines = axes.get_lines()
    assert [line.get_label() for line in lines] == [
        "plain (3 seeds)",
        "late (3 seeds), = plain",
        "other (3 seeds)",
    ]
    assert lines[0].get_linestyle() != lines[1].get_linestyle() and lines[1].get_marker() not in (
        None,
        "None",
    )
    plt.close(figure)


def test_evaluation_curves_are_never_cut_off_and_rounding_zeros_sit_at_the_floor():
    series = {
        "model": {"mean": [1.0, 0.5, 0.1], "low": [0.9, 0.4, 0.08], "high": [1.1, 0.6, 0.12]},
        "averaging": {"mean": [1.0, 5.9, 2.9], "low": [0.9, 4.7, 2.4], "high": [1.1, 7.2, 3.4]},
        "least_squares": {"mean": [1.0, 0.2, 1e-14], "low": [0.9, 0.1, 1e-15], "high": [1.1, 0.3, 1e-13]},
    }
    figure, axes = plt.subplots()
    _draw_series(axes, series, None, log_scale=False)
    assert axes.get_ylim()[1] >= 7.2  # the averaging band's top (the old axis stopped at 2.1)
    figure, axes = plt.subplots()
    _draw_series(axes, series, None, log_scale=True)
    assert axes.get_yscale() == "log" and axes.get_ylim()[0] <= FLOOR
    assert min(axes.get_lines()[2].get_ydata()) == FLOOR
    assert any("drawn at 1e-06" in text.get_text() for text in axes.texts)
    plt.close("all")


def test_plot_titles_name_the_model_not_a_scratch_path(tmp_path):
    run = tmp_path / "scratch" / "quickstart"
    run.mkdir(parents=True)
    assert short_name(str(run)) == "quickstart"
    assert short_name(str(run / "checkpoint-2000")) == "quickstart/checkpoint-2000"
    assert short_name("someone/icl-model") == "someone/icl-model"


def test_the_comparison_plot_states_the_paired_interval(tmp_path):
    """Two sets whose curves look alike (A is 3% below B at every k, for every seed): the paired
    interval excludes 1, and compare.png's title says so."""
    generator = torch.Generator().manual_seed(0)
    errors_b = [torch.rand(64, 6, generator=generator) + 0.5 for _ in range(3)]
    errors_a = [0.97 * e for e in errors_b]
    result = compare_errors(errors_a, errors_b, bootstrap_samples=200)
    result["metadata"] = {
        "labels": ["ConML", "plain"],
        "task": "linear_regression",
        "n_dims": 3,
        "n_prompts": 64,
    }
    summary = paired_summary(result)
    assert summary.startswith(
        "Rel. Min. Error (min ConML / min plain): 0.97 over 3 pair(s), 95% interval [0.97"
    )
    plot_comparison(result, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert result["over_seeds"]["rel_min_error"]["interval"]["high"] == pytest.approx(0.97)


@pytest.mark.parametrize(
    "errors", [[1.02, 0.99, 1.0, 0.98], [1.0, 0.6, 0.1, 0.04]], ids=["plateau", "learning"]
)
def test_the_training_curve_has_plain_error_labels(errors):
    """A run still on the plateau (errors within a few % of 1) read "1.02×10⁰, 9.9×10⁻¹"."""
    from icl_conml.training_plot import training_figure

    history = [{"step": 100 * (i + 1), "loss": 5 * e, "icl_error": e} for i, e in enumerate(errors)]
    figure = training_figure(history)
    right = figure.axes[1]
    labels = _labels(right)
    assert len(labels) >= 2 and all(float(t) > 0 for t in labels)  # plain numbers: float() parses them
    assert right.get_yscale() == ("linear" if max(errors) / min(errors) < 10 else "log")
    plt.close("all")
