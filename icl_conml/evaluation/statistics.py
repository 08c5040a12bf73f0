"""Statistics on error curves: bootstrap over prompts, needed context length, the paper's
Table 5 metrics, and the curve summary that training logs (the Trainer's ``compute_metrics``)
and the ``icl_curve`` metric module return."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..tasks import FunctionClass


def bootstrap_means(errors: torch.Tensor, n_samples: int = 1000, seed: int = 0) -> torch.Tensor:
    """(R, n) means of ``errors`` (N, n) over R resamples of the prompts (with replacement).

    The resample depends only on (N, R, seed): estimators evaluated on the same prompts are
    resampled identically, so paired comparisons stay paired.
    """
    count = errors.shape[0]
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, count, (n_samples, count), generator=generator)
    weights = torch.zeros(n_samples, count, dtype=torch.float64).scatter_add_(
        1, index, torch.ones(n_samples, count, dtype=torch.float64)
    )
    return (weights @ errors.double() / count).float()


def curve_with_interval(errors: torch.Tensor, n_samples: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """Mean error at each k and its bootstrap 95% percentile interval."""
    means = bootstrap_means(errors, n_samples, seed)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975]), dim=0)
    return {"mean": errors.double().mean(0).tolist(), "low": low.tolist(), "high": high.tolist()}


def percentile_interval(samples: torch.Tensor) -> dict[str, Any]:
    """95% percentile interval of bootstrap samples, ignoring undefined (NaN) ones."""
    defined = samples[~torch.isnan(samples)]
    undefined = float(torch.isnan(samples).float().mean())
    if defined.numel() == 0:
        return {"low": None, "high": None, "undefined_fraction": undefined}
    low, high = torch.quantile(defined.double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return {"low": float(low), "high": float(high), "undefined_fraction": undefined}


def needed_context_length(curve: Sequence[float], threshold: float) -> int | None:
    """The smallest k whose error is ≤ threshold; ``None`` if no k in the curve gets there."""
    return next((k for k, value in enumerate(curve) if value <= threshold), None)


def table5_metrics(
    curve_a: torch.Tensor, curve_b: torch.Tensor, tolerance: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Table 5 for curves (..., n) of A against B, batched over leading dims.

    Rel. Min. Error = min_k A / min_k B. Shot Spare = (first k with A ≤ min_k B × (1 + tolerance))
    − argmin_k B, NaN where A never reaches B's minimum (undefined, never invented). Negative = A
    needs fewer. ``tolerance`` (relative; 0 for ``compare``, 1e-3 for a study) keeps an error equal
    to B's minimum up to rounding from counting as never reached.
    """
    best_b, at_b = curve_b.min(dim=-1)  # the first minimum's index, as argmin
    relative = curve_a.min(dim=-1).values / best_b
    reached = curve_a <= (best_b * (1 + tolerance)).unsqueeze(-1)
    first = reached.float().argmax(dim=-1)  # first True (argmax returns the first maximum)
    spare = (first - at_b).float()
    return relative, torch.where(reached.any(dim=-1), spare, torch.full_like(spare, math.nan))


def curve_summary(curve: Sequence[float], n_dims: int, threshold: float = 0.1) -> dict[str, float]:
    """What training logs next to eval_loss: error at k = d and 2d, needed context length (−1 = never)."""
    curve = [float(v) for v in curve]
    summary: dict[str, float] = {}
    for name, k in (("error_at_d", n_dims), ("error_at_2d", 2 * n_dims)):
        if k < len(curve):
            summary[name] = round(curve[k], 6)
    needed = needed_context_length(curve, threshold)
    summary["needed_context_length"] = -1 if needed is None else needed
    return summary


def prediction_curve(
    task: FunctionClass, predictions: Any, targets: Any, threshold: float = 0.1
) -> tuple[list[float], dict[str, float]]:
    """The error at each k of predictions (N, n) against targets (N, n), averaged over prompts,
    and its ``curve_summary``: the one implementation behind ``curve_metrics`` and ``icl_curve``."""
    errors = task.error(torch.as_tensor(predictions).float(), torch.as_tensor(targets).float())
    curve = errors.mean(dim=0).tolist()
    return curve, curve_summary(curve, task.n_dims, threshold)


def curve_metrics(task: FunctionClass, threshold: float = 0.1) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for ``transformers.Trainer``: the model's outputs after the loss are
    its predictions (N, n) and ``label_names=["ys"]`` makes the labels the targets. Besides the
    curve summary it returns the whole curve as ``error_at_k/K`` (Garg et al. log it as
    ``pointwise/loss``), which every ``report_to`` backend records as one scalar per k."""

    def compute(eval_prediction) -> dict[str, float]:
        predictions = eval_prediction.predictions
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        curve, summary = prediction_curve(task, predictions, eval_prediction.label_ids, threshold)
        per_k = {f"error_at_k/{k}": round(float(value), 6) for k, value in enumerate(curve)}
        return {**summary, **per_k}

    return compute


# ---- over seeds (a study's pairs) ---------------------------------------------------------------------
def seed_statistics(values: list[float]) -> dict[str, float | None]:
    """n, mean, sample std (None below 2 values) and median of per-seed values (a study's pairs)."""
    if not values:
        return {"n": 0, "mean": None, "std": None, "median": None}
    tensor = torch.tensor(values, dtype=torch.float64)
    return {
        "n": len(values),
        "mean": float(tensor.mean()),
        "std": float(tensor.std()) if len(values) > 1 else None,
        "median": float(tensor.quantile(0.5)),  # torch.median takes the lower middle value for even n
    }


#: The summary ``compare`` reports over pairs (the same one as a study's).
mean_std = seed_statistics


def pairs_bootstrap_interval(values: list[float], samples: int = 10000, seed: int = 0) -> list[float] | None:
    """95% percentile interval of the mean of per-pair values, pairs resampled with replacement
    (``bootstrap_means`` resamples prompts instead)."""
    if len(values) < 2:
        return None
    low, high = resampled_mean_interval(torch.tensor(values, dtype=torch.float64), samples, seed)
    return [float(low), float(high)]


def resampled_mean_interval(data: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """(2, ...): the 95% percentile interval of the mean of ``data`` over its first dimension (seeds,
    pairs), those rows resampled with replacement ``samples`` times from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, data.shape[0], (samples, data.shape[0]), generator=generator)
    return torch.quantile(data[index].mean(dim=1), torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)


def wilcoxon_signed_rank(differences: list[float]) -> dict[str, float | int | None]:
    """Exact two-sided Wilcoxon signed-rank test of median 0 (zeros dropped, ties get mean ranks).

    The null distribution of W+ is enumerated exactly with a subset-sum count over the
    (doubled, hence integer) ranks, so it is exact also with ties, for any n this study has.
    """
    nonzero = [d for d in differences if d != 0 and not math.isnan(d)]
    n = len(nonzero)
    if n == 0:
        return {"n": 0, "w_plus": None, "p_value": None}
    order = sorted(range(n), key=lambda i: abs(nonzero[i]))
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(nonzero[order[j + 1]]) == abs(nonzero[order[i]]):
            j += 1
        for position in range(i, j + 1):
            ranks[order[position]] = (i + j) / 2 + 1
        i = j + 1
    doubled = [round(2 * r) for r in ranks]
    w_plus = sum(r for r, d in zip(doubled, nonzero, strict=True) if d > 0)
    total = sum(doubled)
    counts = [0] * (total + 1)  # counts[s]: sign assignments whose positive ranks sum to s
    counts[0] = 1
    for rank in doubled:
        for s in range(total, rank - 1, -1):
            counts[s] += counts[s - rank]
    center = total / 2
    extreme = abs(w_plus - center)
    tail = sum(c for s, c in enumerate(counts) if abs(s - center) >= extreme - 1e-9)
    return {"n": n, "w_plus": w_plus / 2, "p_value": min(1.0, tail / 2**n)}
