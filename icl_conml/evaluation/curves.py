"""The evaluation of one model: its error curve and the reference estimators' on the same
prompts, with bootstrap intervals and needed context lengths (the ``results.json`` dict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .arguments import EvaluationArguments
from .loading import load_model
from .predictions import baseline_predictions, errors_of, model_predictions
from .setting import resolve_baselines, resolve_setting
from .statistics import curve_with_interval, needed_context_length

NUMERICAL_ZERO = 1e-6


def evaluate_model(
    model,
    args: EvaluationArguments | None = None,
    *,
    model_id: str | None = None,
    progress: bool | None = False,
) -> dict[str, Any]:
    """Curves of the model and the reference estimators on the same prompts (the results.json dict).

    ``model`` is an ``ICLModel`` or a local path / Hub id; ``args`` default to
    ``EvaluationArguments()``. ``args.baselines`` are specs for ``baselines.parse_baseline``
    (default: the task's); ``[]`` evaluates the model alone. ``model_id`` names an in-memory
    model in the metadata. ``progress``: tqdm bars for the model's forwards and each estimator
    (see ``predictions.progress_bar``).
    """
    args = EvaluationArguments() if args is None else args
    if isinstance(model, str | Path):
        model_id = model_id or str(model)
        model = load_model(
            str(model), args.device, args.allow_unfinished, trust_remote_code=args.trust_remote_code
        )
    model.eval()
    setting = resolve_setting(model.config, args, getattr(model, "task_class", None))
    specs, notes = resolve_baselines(args.baselines, setting.task)
    errors = {
        "model": errors_of(
            setting.task,
            model_predictions(model, setting.prompts, args.batch_size, args.dtype, progress),
            setting.prompts,
        )
    }
    for spec in specs:
        predictions = baseline_predictions(spec, setting.prompts, progress=progress)
        errors[spec.name] = errors_of(setting.task, predictions, setting.prompts)
    return summarise(
        errors,
        metadata={
            "model": model_id or getattr(model, "name_or_path", None) or "in-memory model",
            **setting.metadata(),
            "error_scale": setting.prompts.error_scale,
            "dtype": args.dtype,
            "icl_conml_version": __version__,
            "notes": notes,
        },
        threshold=args.threshold,
        relative_tolerance=args.relative_tolerance,
        bootstrap_samples=args.bootstrap_samples,
        seed=args.seed,
    )


def summarise(
    errors: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    threshold: float = 0.1,
    relative_tolerance: float = 0.1,
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The results.json dict from per-prompt errors (N_e, n) of each estimator."""
    curves, intervals, prompts_used = {}, {}, {}
    for name, matrix in errors.items():
        summary = curve_with_interval(matrix, bootstrap_samples, seed)
        curves[name] = summary["mean"]
        intervals[name] = {"low": summary["low"], "high": summary["high"]}
        prompts_used[name] = int(matrix.shape[0])
    references = [name for name in curves if name != "model"]
    best = min(references, key=lambda name: min(curves[name])) if references else None
    # Errors below NUMERICAL_ZERO are rounding (noiseless least squares reaches ~1e-14).
    within = None if best is None else max((1 + relative_tolerance) * min(curves[best]), NUMERICAL_ZERO)
    n_points = len(next(iter(curves.values())))
    return {
        "metadata": {
            **metadata,
            "threshold": threshold,
            "relative_tolerance": relative_tolerance,
            "bootstrap_samples": bootstrap_samples,
            "prompts_per_estimator": prompts_used,
        },
        "k": list(range(n_points)),
        "curves": curves,
        "intervals": intervals,
        "thresholds": {
            "absolute": threshold,
            "within_best": within,
            "best_reference": best,
        },
        "needed_context_length": {
            "absolute": {name: needed_context_length(curve, threshold) for name, curve in curves.items()},
            "within_best": {
                name: None if within is None else needed_context_length(curve, within)
                for name, curve in curves.items()
            },
        },
    }
