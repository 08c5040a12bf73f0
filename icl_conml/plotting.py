"""Shared pieces of every plot the project writes: a readable logarithmic error axis.

matplotlib's default log axis labels a range inside one decade with minor-tick labels such as
"6×10⁻¹" and "1×10⁰" (the same "1×10⁰" repeated when the range is narrow); ``error_axis`` labels
1-2-5 ticks in plain numbers (0.05, 0.1, 0.2, ...) and falls back to a linear axis when the values
span less than a decade (where a log axis shows nothing a linear one does not). ``FLOOR`` keeps
exact zeros (least squares on noiseless data reaches ~1e-14: rounding) on a log axis.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

#: Errors below this are numerical zero (as ``evaluation.curves.NUMERICAL_ZERO``): drawn at it.
FLOOR = 1e-6


def floored(values: Iterable[float]) -> list[float]:
    """``values`` with everything below ``FLOOR`` (zeros included) raised to it, for a log axis."""
    return [max(float(v), FLOOR) for v in values]


def error_axis(axes, values: Iterable[float], log: bool = True) -> bool:
    """Scale ``axes``' y axis for ``values``: logarithmic with plain 1-2-5 labels when ``log`` and
    the positive values span at least a decade, else linear. Returns whether it is log."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, ScalarFormatter

    positive = [float(v) for v in values if v is not None and math.isfinite(float(v)) and float(v) > 0]
    decades = math.log10(max(positive) / min(positive)) if positive else 0.0
    if not log or decades < 1:
        axes.set_yscale("linear")
        axes.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))  # 1.0002, not "+1" and 0.0002
        return False
    axes.set_yscale("log")
    subs = (1.0,) if decades > 4 else (1.0, 2.0, 5.0)
    axes.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(NullFormatter())
    return True
