"""The paper's Table 5: models A_i against B_i (paired by seed) on identical prompts:
Rel. Min. Error and Shot Spare per pair, over seeds, and on the seed-averaged curves."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .arguments import CompareArguments, EvaluationError
from .loading import load_model
from .pairing import check_pairs
from .predictions import errors_of, model_predictions
from .setting import resolve_setting
from .statistics import bootstrap_means, curve_with_interval, mean_std, percentile_interval, table5_metrics


def _unpaired(count_a: int, count_b: int) -> EvaluationError:
    return EvaluationError(
        f"compare pairs models by seed: got {count_a} model(s) A and {count_b} model(s) B; give as many of each"
    )


def compare_errors(
    errors_a: Sequence[torch.Tensor],
    errors_b: Sequence[torch.Tensor],
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Table 5 from per-prompt errors (N, n) of paired models A_i, B_i on the same prompts."""
    if len(errors_a) != len(errors_b) or not errors_a:
        raise _unpaired(len(errors_a), len(errors_b))
    boot_a = [bootstrap_means(e, bootstrap_samples, seed) for e in errors_a]  # same resample for every model
    boot_b = [bootstrap_means(e, bootstrap_samples, seed) for e in errors_b]
    boots = [table5_metrics(a, b) for a, b in zip(boot_a, boot_b, strict=True)]  # each pair's, per resample
    pairs = []
    for i, (ea, eb) in enumerate(zip(errors_a, errors_b, strict=True)):
        rel, spare = table5_metrics(ea.double().mean(0), eb.double().mean(0))
        rel_boot, spare_boot = boots[i]
        pairs.append(
            {
                "pair": i,
                "rel_min_error": float(rel),
                "shot_spare": None if torch.isnan(spare) else int(spare),
                "rel_min_error_interval": percentile_interval(rel_boot),
                "shot_spare_interval": percentile_interval(spare_boot),
            }
        )
    rel_all, spare_all = (torch.stack(values) for values in zip(*boots, strict=True))  # (P, R) each
    defined_spares = [p["shot_spare"] for p in pairs if p["shot_spare"] is not None]
    mean_a = torch.stack([e.double() for e in errors_a]).mean(0)
    mean_b = torch.stack([e.double() for e in errors_b]).mean(0)
    rel_avg, spare_avg = table5_metrics(mean_a.mean(0), mean_b.mean(0))
    rel_avg_boot, spare_avg_boot = table5_metrics(
        bootstrap_means(mean_a, bootstrap_samples, seed), bootstrap_means(mean_b, bootstrap_samples, seed)
    )
    return {
        "pairs": pairs,
        "over_seeds": {
            "n_pairs": len(pairs),
            "rel_min_error": {
                **mean_std([p["rel_min_error"] for p in pairs]),
                "interval": percentile_interval(rel_all.mean(0)),
            },
            "shot_spare": {
                **mean_std([float(s) for s in defined_spares]),
                "n_defined": len(defined_spares),
                "n_undefined": len(pairs) - len(defined_spares),
                "interval": percentile_interval(torch.nanmean(spare_all, dim=0)),
            },
        },
        "seed_averaged_curves": {
            "rel_min_error": float(rel_avg),
            "shot_spare": None if torch.isnan(spare_avg) else int(spare_avg),
            "rel_min_error_interval": percentile_interval(rel_avg_boot),
            "shot_spare_interval": percentile_interval(spare_avg_boot),
        },
        "curves": {
            "a": [e.double().mean(0).tolist() for e in errors_a],
            "b": [e.double().mean(0).tolist() for e in errors_b],
            "a_mean": curve_with_interval(mean_a, bootstrap_samples, seed),
            "b_mean": curve_with_interval(mean_b, bootstrap_samples, seed),
        },
    }


def _model_id(model: Any, fallback: str) -> str:
    return model if isinstance(model, str) else getattr(model, "name_or_path", "") or fallback


def compare_models(
    models_a: Sequence,
    models_b: Sequence,
    args: CompareArguments | None = None,
    *,
    progress: bool | None = False,
) -> dict[str, Any]:
    """The paper's Table 5 for models A_i against B_i (paired by position), on identical prompts.

    The pairs are checked first (``pairing.check_pairs``: a pair shares its seed and training
    length, one side's models differ only in their seed), as the experiment analysis pairs runs.

    Models are ``ICLModel`` objects or local paths / Hub ids; ``args`` default to
    ``CompareArguments()``. The task, dimension and prompt length default to the first A
    model's config (the length to the shortest n_positions).
    """
    args = CompareArguments() if args is None else args
    if len(models_a) != len(models_b) or not models_a:
        raise _unpaired(len(models_a), len(models_b))
    ids_a = [_model_id(m, f"A{i}") for i, m in enumerate(models_a)]
    ids_b = [_model_id(m, f"B{i}") for i, m in enumerate(models_b)]
    pairing = check_pairs(ids_a, ids_b, list(models_a), list(models_b))  # before any model is loaded
    loaded = [
        load_model(m, args.device, args.allow_unfinished, trust_remote_code=args.trust_remote_code)
        if isinstance(m, str | Path)
        else m.eval()
        for m in [*models_a, *models_b]
    ]
    config = loaded[0].config
    for model, name in zip(loaded, [*ids_a, *ids_b], strict=True):
        if model.config.task != config.task or model.config.n_dims != config.n_dims:
            raise EvaluationError(
                f"model {name!r} was trained on {model.config.task} with d={model.config.n_dims}, but "
                f"{ids_a[0]!r} on {config.task} with d={config.n_dims}; compare models of one task"
            )
    shortest = min(m.config.n_positions for m in loaded)
    if args.n_points is None and args.eval_set is None:
        args = dataclasses.replace(args, n_points=shortest)
    setting = resolve_setting(config, args, getattr(loaded[0], "task_class", None))
    if setting.n_points > shortest:
        raise EvaluationError(f"prompts of {setting.n_points} points exceed a model's n_positions={shortest}")
    errors = [
        errors_of(
            setting.task,
            model_predictions(m, setting.prompts, args.batch_size, args.dtype, progress),
            setting.prompts,
        )
        for m in loaded
    ]
    result = compare_errors(
        errors[: len(models_a)], errors[len(models_a) :], args.bootstrap_samples, args.seed
    )
    result["metadata"] = {
        "labels": list(args.labels),
        "models_a": ids_a,
        "models_b": ids_b,
        "pairing": pairing,
        **setting.metadata(),
        "bootstrap_samples": args.bootstrap_samples,
        "dtype": args.dtype,
        "icl_conml_version": __version__,
    }
    return result
