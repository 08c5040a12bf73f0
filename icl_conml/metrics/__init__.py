"""Metric modules for the ``evaluate`` library, shipped inside the package and loaded by path.

``evaluate.load("name")`` fetches metric scripts from the Hub, which fails offline; a module
loaded from a local path works anywhere: ``icl_conml.metrics.load("icl_curve")``.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).parent


def path(name: str) -> str:
    """The local path of a shipped metric module (pass it to ``evaluate.load``)."""
    module = METRICS_DIR / f"{name}.py"
    if not module.is_file():
        available = sorted(p.stem for p in METRICS_DIR.glob("*.py") if p.stem != "__init__")
        raise ValueError(f"no metric module {name!r} in icl_conml.metrics; available: {', '.join(available)}")
    return str(module)


def load(name: str = "icl_curve", **kwargs):
    """``evaluate.load`` of a shipped metric module, offline."""
    from ..extras import require

    return require("evaluate", "the icl_curve metric module").load(path(name), **kwargs)
