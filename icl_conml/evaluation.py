"""Few-shot evaluation: how many in-context examples does a model need?

``python -m icl_conml.evaluation --model PATH_OR_HUB_ID --output_dir OUT [...]`` measures
the error at k (the normalised squared error of the prediction for the (k+1)-th query after
k examples, ``task.error``) for k = 0 … n_points − 1, for the model and the reference
estimators of ``baselines.py``, on the same prompts; writes ``results.json`` (curves,
bootstrap 95% intervals, needed context lengths, metadata), ``results.md`` and ``curves.png``.

``python -m icl_conml.evaluation compare --models A1 [A2 …] --against B1 [B2 …] --output_dir
OUT`` gives the paper's Table 5 (Rel. Min. Error, Shot Spare), models paired by seed.

A model's whole curve takes one forward pass per batch: the causal model's prediction at
position k sees exactly the k pairs before it. Only the out-of-distribution prompts whose
query is not the next in-context input (``orthant``, ``orthogonal_query``,
``repeated_query``) take one forward per k.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import __version__
from .baselines import BaselineError, BaselineSpec, default_baselines, parse_baseline, sklearn_available
from .data import step_generator
from .errors import OneLineParser, UserError, command_name, entry_point
from .extras import is_available, require
from .extras import message as missing_message
from .tasks import TASK_REGISTRY, FunctionClass, get_task, resolve_task_class

# A stream of the (seed, step, stream) generator used by no training purpose (see data.py).
_EVALUATION_STREAM = 5
OOD_KINDS = ("scale_x", "scale_y", "noisy_y", "skewed", "orthant", "orthogonal_query", "repeated_query")
_OOD_DEFAULT_VALUES = {"noisy_y": 1.0}
_OOD_NEEDS_VALUE = ("scale_x", "scale_y")
NUMERICAL_ZERO = 1e-6


class EvaluationError(UserError, ValueError):
    """A user error (bad model id, eval set, option): reported as one line by the CLI (exit 2)."""


# ---- prompts ---------------------------------------------------------------------------------------
@dataclass
class Prompts:
    """Evaluation prompts. ``queries`` (N, n, d), when given, replace ``xs[:, k]`` as the k-th
    query (targets ``query_ys``); errors are divided by ``error_scale`` on top of the task's
    normaliser (scaled prompts are normalised back so that predicting 0 still scores about 1)."""

    xs: torch.Tensor
    ys: torch.Tensor
    queries: torch.Tensor | None = None
    query_ys: torch.Tensor | None = None
    error_scale: float = 1.0

    @property
    def targets(self) -> torch.Tensor:
        return self.ys if self.query_ys is None else self.query_ys

    def subset(self, count: int) -> Prompts:
        cut = lambda t: None if t is None else t[:count]  # noqa: E731
        return Prompts(cut(self.xs), cut(self.ys), cut(self.queries), cut(self.query_ys), self.error_scale)


def parse_ood(spec: str | None) -> tuple[str, float | None] | None:
    """``NAME`` or ``NAME=VALUE``: scale_x=3, scale_y=0.5, noisy_y=1.0, skewed, orthant, ..."""
    if not spec:
        return None
    kind, sep, value = spec.partition("=")
    if kind not in OOD_KINDS:
        raise EvaluationError(f"unknown --ood {kind!r}; choose one of {', '.join(OOD_KINDS)}")
    if kind in _OOD_NEEDS_VALUE and not sep:
        raise EvaluationError(f"--ood {kind} needs a factor, e.g. --ood {kind}=3 (Garg et al.: 0.333 … 3)")
    number = _OOD_DEFAULT_VALUES.get(kind)
    if sep:
        try:
            number = float(value)
        except ValueError:
            raise EvaluationError(f"--ood {spec!r}: {value!r} is not a number") from None
        if number <= 0 and kind != "noisy_y" or number < 0:
            raise EvaluationError(f"--ood {spec!r}: the value must be positive")
    return kind, number


def _error_scale(task: FunctionClass, ood: tuple[str, float | None] | None) -> float:
    if ood is None or ood[0] not in _OOD_NEEDS_VALUE or task.name == "linear_classification":
        return 1.0
    return float(ood[1]) ** 2


def sample_prompts(
    task: FunctionClass, n_prompts: int, n_points: int, seed: int, ood: str | None = None
) -> Prompts:
    """Fresh prompts of ``task`` drawn from ``seed`` (optionally Garg et al.'s distribution shifts).

    - ``scale_x=c`` / ``scale_y=c``: inputs / weights (hence labels) multiplied by c.
    - ``noisy_y=σ``: N(0, σ²) noise added to every label.
    - ``skewed``: x ~ N(0, Σ), Σ with eigenvalues ∝ 1/i in a random basis, trace d.
    - ``orthant``: in-context inputs in one random orthant per prompt; queries from N(0, I).
    - ``orthogonal_query``: the k-th query is orthogonal to the k examples before it (same
      norm as x_k); prompts are cut to n_points ≤ d, where that is possible.
    - ``repeated_query``: the k-th query is one of the k examples before it.
    """
    shift = parse_ood(ood)
    if shift is not None and not task.linear:
        linear = ", ".join(name for name, cls in TASK_REGISTRY.items() if cls.linear)
        raise EvaluationError(f"--ood applies to linear function classes ({linear}), not {task.name!r}")
    generator = step_generator(seed, 0, _EVALUATION_STREAM)
    params = task.sample_params(n_prompts, generator)
    xs = task.sample_xs(n_prompts, n_points, generator)
    kind, value = shift if shift is not None else (None, None)
    queries = None
    d = task.n_dims
    if kind == "scale_x":
        xs = xs * value
    elif kind == "scale_y":
        params = {**params, "w": params["w"] * value}
    elif kind == "skewed":
        eigenvalues = 1.0 / torch.arange(1, d + 1, dtype=torch.float32)
        eigenvalues = eigenvalues * d / eigenvalues.sum()
        basis, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
        xs = xs @ (basis * eigenvalues.sqrt()).T
    elif kind == "orthant":
        signs = torch.randn(n_prompts, 1, d, generator=generator).sign()
        queries = xs
        xs = xs.abs() * signs
    elif kind == "orthogonal_query":
        xs = xs[:, : min(n_points, d)]
        q, r = torch.linalg.qr(xs.transpose(1, 2))  # column k spans x_k's part orthogonal to x_<k
        direction = (q * r.diagonal(dim1=-2, dim2=-1).sign().unsqueeze(1)).transpose(1, 2)
        queries = direction * xs.norm(dim=-1, keepdim=True)
    elif kind == "repeated_query":
        counts = torch.arange(xs.shape[1]).clamp(min=1)
        index = (torch.rand(n_prompts, xs.shape[1], generator=generator) * counts).long()
        queries = torch.gather(xs, 1, index.unsqueeze(-1).expand(-1, -1, d))
    ys = task.evaluate(params, xs, generator)
    query_ys = None if queries is None else task.evaluate(params, queries, generator)
    if kind == "noisy_y":
        ys = ys + value * torch.randn(ys.shape, generator=generator)
    return Prompts(xs, ys, queries, query_ys, _error_scale(task, shift))


# ---- loading ----------------------------------------------------------------------------------------
def load_model(name_or_path: str, device: str | torch.device = "cpu"):
    """An ``ICLModel`` from a local directory or a Hub id (the cache is used when offline)."""
    from .modeling import ICLModel

    try:
        model = ICLModel.from_pretrained(name_or_path)
    except Exception as error:  # transformers/huggingface_hub raise many types for "not found"
        where = "local directory" if Path(name_or_path).exists() else "local path or Hub id"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EvaluationError(
            f"cannot load model {name_or_path!r} ({where}): {first[:200]}; pass a training output_dir "
            f"(with config.json) or a Hub id that is in the Hugging Face cache or reachable online"
        ) from None
    return model.to(device).eval()


def load_eval_set(name: str) -> tuple[Prompts, dict[str, Any]]:
    """Prompts and metadata from a ``datasets`` eval set: a ``save_to_disk`` folder, or
    ``REPO`` / ``REPO:CONFIG`` on the Hub, from the HF cache when offline (written by
    ``data_scripts/make_eval_sets.py``; see ``eval_sets.load``)."""
    from . import eval_sets

    try:
        dataset = eval_sets.load(name)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EvaluationError(
            f"cannot load eval set {name!r}: {first[:200]}; pass a folder written by "
            f"data_scripts/make_eval_sets.py or a Hub dataset REPO[:CONFIG]"
        ) from None
    missing = set(eval_sets.COLUMNS) - set(dataset.column_names)
    if missing:
        raise EvaluationError(
            f"eval set {name!r} lacks column(s) {', '.join(sorted(missing))}; build it with data_scripts/make_eval_sets.py"
        )
    first_row = dataset[0]
    metadata = {
        "task": first_row["task"],
        "n_dims": int(first_row["n_dims"]),
        "n_points": int(first_row["n_points"]),
        "seed": int(first_row["seed"]) if "seed" in dataset.column_names else None,
        "task_kwargs": json.loads(first_row.get("task_kwargs") or "{}"),
        "ood": first_row.get("ood") or None,
    }
    columns = [c for c in ("xs", "ys", "query_xs", "query_ys") if c in dataset.column_names]
    table = dataset.with_format("torch", columns=columns)[:]
    task = get_task(metadata["task"], metadata["n_dims"], **metadata["task_kwargs"])
    prompts = Prompts(
        table["xs"].float(),
        table["ys"].float(),
        table["query_xs"].float() if "query_xs" in table else None,
        table["query_ys"].float() if "query_ys" in table else None,
        _error_scale(task, parse_ood(metadata["ood"])),
    )
    return prompts, metadata


# ---- predictions and errors ---------------------------------------------------------------------------
def progress_bar(total: int, description: str, progress: bool | None) -> tqdm:
    """A tqdm bar on stderr: ``progress`` True shows it, False hides it, None shows it only when
    stderr is a terminal (the CLI's default; ``--quiet`` passes False). A finished bar stays, with its time."""
    return tqdm(total=total, desc=description, disable=None if progress is None else not progress)


@torch.no_grad()
def model_predictions(
    model,
    prompts: Prompts,
    batch_size: int = 256,
    dtype: str = "float32",
    progress: bool | None = False,
) -> torch.Tensor:
    """(N, n) predictions: one forward per batch (one per k and batch when queries differ).

    ``dtype="bfloat16"`` runs the forward under bf16 autocast: about 1.8× faster on a CPU with
    AVX-512 BF16, with predictions that differ by ~1e-2. ``progress``: see ``progress_bar``.
    """
    device = next(model.parameters()).device
    if dtype not in ("float32", "bfloat16"):
        raise EvaluationError(f"--dtype {dtype!r} is not supported; use float32 or bfloat16")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        return _model_predictions(model, prompts, batch_size, device, progress)


def _model_predictions(
    model, prompts: Prompts, batch_size: int, device: torch.device, progress: bool | None = False
) -> torch.Tensor:
    n_dims = model.config.n_dims
    out = []
    batches = range(0, prompts.xs.shape[0], batch_size)
    forwards = len(batches) * (1 if prompts.queries is None else prompts.xs.shape[1])
    with progress_bar(forwards, "model forwards", progress) as bar:
        for start in batches:
            xs = _pad(prompts.xs[start : start + batch_size], n_dims).to(device)
            ys = prompts.ys[start : start + batch_size].to(device)
            if prompts.queries is None:
                out.append(model(xs=xs, ys=ys).predictions.float().cpu())
                bar.update()
                continue
            queries = _pad(prompts.queries[start : start + batch_size], n_dims).to(device)
            column = []
            for k in range(xs.shape[1]):
                prefix = torch.cat([xs[:, :k], queries[:, k : k + 1]], dim=1)
                column.append(model(xs=prefix, ys=ys[:, : k + 1]).predictions[:, k].float().cpu())
                bar.update()
            out.append(torch.stack(column, dim=1))
    return torch.cat(out)


def _pad(xs: torch.Tensor, n_dims: int) -> torch.Tensor:
    """Zero-pad inputs of a smaller dimension (as the curriculum does during training)."""
    if xs.shape[-1] == n_dims:
        return xs
    return torch.nn.functional.pad(xs, (0, n_dims - xs.shape[-1]))


def baseline_predictions(
    spec: BaselineSpec, prompts: Prompts, chunk_size: int = 256, progress: bool | None = False
) -> torch.Tensor:
    """(N', n) predictions of a reference estimator, N' = min(N, spec.max_prompts).

    ``progress`` (see ``progress_bar``) counts prompts: per-prompt estimators (trees, boosting)
    are the slow ones, so their chunks are smaller to keep the bar moving."""
    count = prompts.xs.shape[0] if spec.max_prompts is None else min(spec.max_prompts, prompts.xs.shape[0])
    chunk_size = min(chunk_size, 16) if spec.needs_sklearn else chunk_size
    parts = []
    with progress_bar(count, spec.name, progress) as bar:
        for start in range(0, count, chunk_size):
            stop = min(start + chunk_size, count)
            queries = None if prompts.queries is None else prompts.queries[start:stop]
            parts.append(spec(prompts.xs[start:stop], prompts.ys[start:stop], queries).float())
            bar.update(stop - start)
    return torch.cat(parts)


def errors_of(task: FunctionClass, predictions: torch.Tensor, prompts: Prompts) -> torch.Tensor:
    """(N, n) per-prompt errors at each k."""
    targets = prompts.targets[: predictions.shape[0]]
    return task.error(predictions.float(), targets.float()) / prompts.error_scale


# ---- statistics ---------------------------------------------------------------------------------------
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


def needed_context_length(curve: Sequence[float], threshold: float) -> int | None:
    """The smallest k whose error is ≤ threshold; ``None`` if no k in the curve gets there."""
    for k, value in enumerate(curve):
        if value <= threshold:
            return k
    return None


def table5_metrics(curve_a: torch.Tensor, curve_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Table 5 for curves (..., n) of A against B, batched over leading dims.

    Rel. Min. Error = min_k A / min_k B. Shot Spare = (first k with A ≤ min_k B) − argmin_k B,
    NaN where A never reaches B's minimum (undefined, never invented). Negative = A needs fewer.
    """
    best_b, at_b = curve_b.min(dim=-1)
    relative = curve_a.min(dim=-1).values / best_b
    reached = curve_a <= best_b.unsqueeze(-1)
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


def curve_metrics(task: FunctionClass, threshold: float = 0.1) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for ``transformers.Trainer``: the model's outputs after the loss are
    its predictions (N, n) and ``label_names=["ys"]`` makes the labels the targets. Besides the
    curve summary it returns the whole curve as ``error_at_k/K`` (Garg et al. log it as
    ``pointwise/loss``), which every ``report_to`` backend records as one scalar per k."""

    def compute(eval_prediction) -> dict[str, float]:
        predictions = eval_prediction.predictions
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        errors = task.error(
            torch.as_tensor(predictions).float(), torch.as_tensor(eval_prediction.label_ids).float()
        )
        curve = errors.mean(dim=0).tolist()
        per_k = {f"error_at_k/{k}": round(float(value), 6) for k, value in enumerate(curve)}
        return {**curve_summary(curve, task.n_dims, threshold), **per_k}

    return compute


# ---- the evaluation ------------------------------------------------------------------------------------
@dataclass
class Setting:
    """What is evaluated: the task, the prompts and where they came from."""

    task: FunctionClass
    task_kwargs: dict[str, Any]
    n_points: int
    prompts: Prompts
    source: dict[str, Any]


def resolve_setting(
    config,
    *,
    task: str | None = None,
    task_kwargs: dict[str, Any] | None = None,
    n_dims: int | None = None,
    n_points: int | None = None,
    n_prompts: int = 1280,
    seed: int = 0,
    ood: str | None = None,
    eval_set: str | None = None,
) -> Setting:
    """Task, dimension and length default to the model's saved config; an eval set must match."""
    task_name = task or config.task
    try:
        resolve_task_class(task_name)
    except ValueError as error:
        raise EvaluationError(str(error).replace("unknown task", "unknown --task", 1)) from None
    kwargs = dict(config.task_kwargs if task_name == config.task else {})
    kwargs.update(task_kwargs or {})
    dims = n_dims or config.n_dims
    if dims > config.n_dims:
        raise EvaluationError(
            f"--n_dims {dims} is larger than the model's input dimension {config.n_dims}; use at most {config.n_dims}"
        )
    if eval_set is not None:
        if ood is not None:
            raise EvaluationError(
                "--ood and --eval_set exclude each other: an eval set holds its prompts; "
                "build a shifted one with data_scripts/make_eval_sets.py --ood"
            )
        prompts, meta = load_eval_set(eval_set)
        if meta["task"] != task_name or meta["n_dims"] != dims:
            raise EvaluationError(
                f"eval set {eval_set!r} holds {meta['task']} prompts of dimension {meta['n_dims']}, but the "
                f"evaluation is {task_name} with n_dims={dims}; build a matching set with "
                f"data_scripts/make_eval_sets.py or pass --task/--n_dims"
            )
        if meta["n_points"] > config.n_positions:
            raise EvaluationError(
                f"eval set {eval_set!r} has {meta['n_points']} points per prompt, more than the model's "
                f"n_positions={config.n_positions}"
            )
        if n_points is not None and n_points != meta["n_points"]:
            raise EvaluationError(
                f"--n_points {n_points} differs from the eval set's {meta['n_points']}; drop it"
            )
        kwargs = {**kwargs, **meta["task_kwargs"]}
        function_class = get_task(task_name, dims, **kwargs)
        source = {"eval_set": eval_set, "seed": meta["seed"], "ood": meta["ood"]}
        return Setting(function_class, kwargs, prompts.xs.shape[1], prompts, source)
    length = n_points or config.n_positions
    if length > config.n_positions:
        raise EvaluationError(
            f"--n_points {length} is beyond the model's n_positions={config.n_positions}; use at most that"
        )
    if n_prompts < 1:
        raise EvaluationError(f"--n_prompts {n_prompts} must be >= 1")
    try:
        function_class = get_task(task_name, dims, **kwargs)
    except ValueError as error:
        raise EvaluationError(str(error)) from None
    prompts = sample_prompts(function_class, n_prompts, length, seed, ood)
    return Setting(
        function_class, kwargs, prompts.xs.shape[1], prompts, {"eval_set": None, "seed": seed, "ood": ood}
    )


def resolve_baselines(
    names: Sequence[str] | None, task: FunctionClass
) -> tuple[list[BaselineSpec], list[str]]:
    """Specs for ``names`` (default: the task's); scikit-learn ones are skipped, with a note,
    when they are defaults and scikit-learn is missing, and are an error when asked for."""
    notes = []
    requested = list(names) if names is not None else list(default_baselines(task.name))
    specs = []
    try:
        for name in requested:
            spec = parse_baseline(name, task)
            if spec.needs_sklearn and not sklearn_available():
                if names is not None:
                    raise BaselineError(
                        f"baseline {name!r} needs scikit-learn, which is not installed; pip install 'icl_conml[trees]'"
                    )
                notes.append(
                    f"skipped {name}: scikit-learn is not installed (pip install 'icl_conml[trees]')"
                )
                continue
            specs.append(spec)
    except BaselineError as error:
        raise EvaluationError(str(error)) from None
    return specs, notes


def evaluate_model(
    model,
    *,
    model_id: str | None = None,
    task: str | None = None,
    task_kwargs: dict[str, Any] | None = None,
    n_dims: int | None = None,
    n_points: int | None = None,
    n_prompts: int = 1280,
    seed: int = 0,
    threshold: float = 0.1,
    relative_tolerance: float = 0.1,
    baselines: Sequence[str] | None = None,
    ood: str | None = None,
    eval_set: str | None = None,
    batch_size: int = 256,
    bootstrap_samples: int = 1000,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool | None = False,
) -> dict[str, Any]:
    """Curves of the model and the reference estimators on the same prompts (the results.json dict).

    ``model`` is an ``ICLModel`` or a local path / Hub id. ``baselines`` are specs for
    ``baselines.parse_baseline`` (default: the task's); pass ``[]`` for the model alone.
    ``progress``: tqdm bars for the model's forwards and each estimator (see ``progress_bar``).
    """
    if isinstance(model, str | Path):
        model_id = model_id or str(model)
        model = load_model(str(model), device)
    model.eval()
    setting = resolve_setting(
        model.config,
        task=task,
        task_kwargs=task_kwargs,
        n_dims=n_dims,
        n_points=n_points,
        n_prompts=n_prompts,
        seed=seed,
        ood=ood,
        eval_set=eval_set,
    )
    specs, notes = resolve_baselines(baselines, setting.task)
    errors = {
        "model": errors_of(
            setting.task,
            model_predictions(model, setting.prompts, batch_size, dtype, progress),
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
            "task": setting.task.name,
            "task_kwargs": setting.task_kwargs,
            "n_dims": setting.task.n_dims,
            "n_points": setting.n_points,
            "n_prompts": int(setting.prompts.xs.shape[0]),
            "seed": setting.source["seed"],
            "eval_set": setting.source["eval_set"],
            "ood": setting.source["ood"],
            "error_scale": setting.prompts.error_scale,
            "dtype": dtype,
            "icl_conml_version": __version__,
            "notes": notes,
        },
        threshold=threshold,
        relative_tolerance=relative_tolerance,
        bootstrap_samples=bootstrap_samples,
        seed=seed,
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
    relative: dict[str, Any] = {"threshold": None, "best_reference": None}
    if references:
        best = min(references, key=lambda name: min(curves[name]))
        # Errors below NUMERICAL_ZERO are rounding (noiseless least squares reaches ~1e-14).
        floor = max((1 + relative_tolerance) * min(curves[best]), NUMERICAL_ZERO)
        relative = {"threshold": floor, "best_reference": best}
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
            "within_best": relative["threshold"],
            "best_reference": relative["best_reference"],
        },
        "needed_context_length": {
            "absolute": {name: needed_context_length(curve, threshold) for name, curve in curves.items()},
            "within_best": {
                name: None
                if relative["threshold"] is None
                else needed_context_length(curve, relative["threshold"])
                for name, curve in curves.items()
            },
        },
    }


# ---- reports ---------------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
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
        lines.append(f"| {k} | " + " | ".join(_fmt(results["curves"][name][k]) for name in names) + " |")
    thresholds = results["thresholds"]
    within = thresholds["within_best"]
    lines += [
        "",
        "Needed context length (smallest k with error ≤ threshold; — = not within the prompt)",
        "",
        "| threshold | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        f"| ≤ {_fmt(thresholds['absolute'])} | "
        + " | ".join(_fmt(results["needed_context_length"]["absolute"][n]) for n in names)
        + " |",
    ]
    if within is not None:
        lines.append(
            f"| ≤ {_fmt(within)} (best {thresholds['best_reference']} + {results['metadata']['relative_tolerance']:.0%}) | "
            + " | ".join(_fmt(results["needed_context_length"]["within_best"][n]) for n in names)
            + " |"
        )
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
    figure.savefig(path)
    plt.close(figure)


def write_results(results: dict[str, Any], output_dir: str | Path, log_scale: bool = False) -> Path:
    """results.json, results.md and curves.png in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_table(results))
    meta = results["metadata"]
    series = {
        name: {"mean": curve, **results["intervals"][name]} for name, curve in results["curves"].items()
    }
    styles = {"model": {"linewidth": 2.5, "color": "black"}}
    title = f"{meta['model']}: {meta['task']}, d={meta['n_dims']}" + (
        f", {meta['ood']}" if meta.get("ood") else ""
    )
    if _can_plot("curves.png"):
        plot_curves(series, out / "curves.png", title, log_scale, styles)
    return out


def _can_plot(name: str) -> bool:
    """Whether matplotlib is installed; if not, say on stderr which plot is skipped and how to get it."""
    if is_available("matplotlib"):
        return True
    print(
        f"icl_conml: note: {name} not written: {missing_message('matplotlib', 'plotting')}", file=sys.stderr
    )
    return False


# ---- comparison (Table 5) --------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None}
    tensor = torch.tensor(values, dtype=torch.float64)
    std = float(tensor.std(unbiased=True)) if len(values) > 1 else 0.0
    return {"mean": float(tensor.mean()), "std": std}


def _interval(samples: torch.Tensor) -> dict[str, Any]:
    """95% percentile interval of bootstrap samples, ignoring undefined (NaN) ones."""
    defined = samples[~torch.isnan(samples)]
    undefined = float(torch.isnan(samples).float().mean())
    if defined.numel() == 0:
        return {"low": None, "high": None, "undefined_fraction": undefined}
    low, high = torch.quantile(defined.double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return {"low": float(low), "high": float(high), "undefined_fraction": undefined}


def compare_errors(
    errors_a: Sequence[torch.Tensor],
    errors_b: Sequence[torch.Tensor],
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Table 5 from per-prompt errors (N, n) of paired models A_i, B_i on the same prompts."""
    if len(errors_a) != len(errors_b) or not errors_a:
        raise EvaluationError(
            f"compare pairs models by seed: got {len(errors_a)} model(s) A and {len(errors_b)} model(s) B; give as many of each"
        )
    boot_a = [bootstrap_means(e, bootstrap_samples, seed) for e in errors_a]  # same resample for every model
    boot_b = [bootstrap_means(e, bootstrap_samples, seed) for e in errors_b]
    pairs = []
    for i, (ea, eb) in enumerate(zip(errors_a, errors_b, strict=True)):
        rel, spare = table5_metrics(ea.double().mean(0), eb.double().mean(0))
        rel_boot, spare_boot = table5_metrics(boot_a[i], boot_b[i])
        pairs.append(
            {
                "pair": i,
                "rel_min_error": float(rel),
                "shot_spare": None if torch.isnan(spare) else int(spare),
                "rel_min_error_interval": _interval(rel_boot),
                "shot_spare_interval": _interval(spare_boot),
            }
        )
    rel_all = torch.stack([table5_metrics(a, b)[0] for a, b in zip(boot_a, boot_b, strict=True)])  # (P, R)
    spare_all = torch.stack([table5_metrics(a, b)[1] for a, b in zip(boot_a, boot_b, strict=True)])
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
                **_mean_std([p["rel_min_error"] for p in pairs]),
                "interval": _interval(rel_all.mean(0)),
            },
            "shot_spare": {
                **_mean_std([float(s) for s in defined_spares]),
                "n_defined": len(defined_spares),
                "n_undefined": len(pairs) - len(defined_spares),
                "interval": _interval(torch.nanmean(spare_all, dim=0)),
            },
        },
        "seed_averaged_curves": {
            "rel_min_error": float(rel_avg),
            "shot_spare": None if torch.isnan(spare_avg) else int(spare_avg),
            "rel_min_error_interval": _interval(rel_avg_boot),
            "shot_spare_interval": _interval(spare_avg_boot),
        },
        "curves": {
            "a": [e.double().mean(0).tolist() for e in errors_a],
            "b": [e.double().mean(0).tolist() for e in errors_b],
            "a_mean": curve_with_interval(mean_a, bootstrap_samples, seed),
            "b_mean": curve_with_interval(mean_b, bootstrap_samples, seed),
        },
    }


def compare_models(
    models_a: Sequence,
    models_b: Sequence,
    *,
    labels: tuple[str, str] = ("A", "B"),
    task: str | None = None,
    task_kwargs: dict[str, Any] | None = None,
    n_dims: int | None = None,
    n_points: int | None = None,
    n_prompts: int = 1280,
    seed: int = 0,
    ood: str | None = None,
    eval_set: str | None = None,
    batch_size: int = 256,
    bootstrap_samples: int = 1000,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool | None = False,
) -> dict[str, Any]:
    """The paper's Table 5 for models A_i against B_i (paired by position), on identical prompts.

    Models are ``ICLModel`` objects or local paths / Hub ids. The task, dimension and prompt
    length default to the first A model's config (the length to the shortest n_positions).
    """
    if len(models_a) != len(models_b) or not models_a:
        raise EvaluationError(
            f"compare pairs models by seed: got {len(models_a)} model(s) A and {len(models_b)} model(s) B; give as many of each"
        )
    ids_a = [
        m if isinstance(m, str) else getattr(m, "name_or_path", "") or f"A{i}" for i, m in enumerate(models_a)
    ]
    ids_b = [
        m if isinstance(m, str) else getattr(m, "name_or_path", "") or f"B{i}" for i, m in enumerate(models_b)
    ]
    loaded = [
        load_model(m, device) if isinstance(m, str | Path) else m.eval() for m in [*models_a, *models_b]
    ]
    config = loaded[0].config
    for model, name in zip(loaded, [*ids_a, *ids_b], strict=True):
        if model.config.task != config.task or model.config.n_dims != config.n_dims:
            raise EvaluationError(
                f"model {name!r} was trained on {model.config.task} with d={model.config.n_dims}, but "
                f"{ids_a[0]!r} on {config.task} with d={config.n_dims}; compare models of one task"
            )
    shortest = min(m.config.n_positions for m in loaded)
    if n_points is None and eval_set is None:
        n_points = shortest
    setting = resolve_setting(
        config,
        task=task,
        task_kwargs=task_kwargs,
        n_dims=n_dims,
        n_points=n_points,
        n_prompts=n_prompts,
        seed=seed,
        ood=ood,
        eval_set=eval_set,
    )
    if setting.n_points > shortest:
        raise EvaluationError(f"prompts of {setting.n_points} points exceed a model's n_positions={shortest}")
    errors = [
        errors_of(
            setting.task, model_predictions(m, setting.prompts, batch_size, dtype, progress), setting.prompts
        )
        for m in loaded
    ]
    result = compare_errors(errors[: len(models_a)], errors[len(models_a) :], bootstrap_samples, seed)
    result["metadata"] = {
        "labels": list(labels),
        "models_a": ids_a,
        "models_b": ids_b,
        "task": setting.task.name,
        "task_kwargs": setting.task_kwargs,
        "n_dims": setting.task.n_dims,
        "n_points": setting.n_points,
        "n_prompts": int(setting.prompts.xs.shape[0]),
        "seed": setting.source["seed"],
        "eval_set": setting.source["eval_set"],
        "ood": setting.source["ood"],
        "bootstrap_samples": bootstrap_samples,
        "dtype": dtype,
        "icl_conml_version": __version__,
    }
    return result


def comparison_table(result: dict[str, Any]) -> str:
    a, b = result["metadata"]["labels"]
    over = result["over_seeds"]
    avg = result["seed_averaged_curves"]

    def interval(entry: dict[str, Any]) -> str:
        return f"[{_fmt(entry['low'])}, {_fmt(entry['high'])}]"

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
        f"{interval(over['rel_min_error']['interval'])} | {_fmt(avg['rel_min_error'])} {interval(avg['rel_min_error_interval'])} |",
        f"| Shot Spare (first k {a} ≤ min {b} − argmin {b}) | {mean_std(spare)} "
        f"(defined for {spare['n_defined']}/{over['n_pairs']}; undefined: {spare['n_undefined']}) | "
        f"{interval(spare['interval'])} | {_fmt(avg['shot_spare'])} {interval(avg['shot_spare_interval'])} |",
        "",
        "| pair | Rel. Min. Error | Shot Spare |",
        "|---|---|---|",
    ]
    for pair in result["pairs"]:
        shot = (
            "undefined (never reaches B's minimum)" if pair["shot_spare"] is None else str(pair["shot_spare"])
        )
        lines.append(f"| {pair['pair']} | {_fmt(pair['rel_min_error'])} | {shot} |")
    return "\n".join(lines) + "\n"


def write_comparison(result: dict[str, Any], output_dir: str | Path, log_scale: bool = False) -> Path:
    """compare.json, compare.md and compare.png (every model's curve, seed means with bands)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "compare.md").write_text(comparison_table(result))
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
    if _can_plot("compare.png"):
        title = f"{a} vs {b}: {meta['task']}, d={meta['n_dims']}"
        plot_curves(series, out / "compare.png", title, log_scale, styles)
    return out


# ---- CLI -------------------------------------------------------------------------------------------------
def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", required=True, help="Where results are written.")
    parser.add_argument("--task", default=None, help="Function class (default: the model's).")
    parser.add_argument(
        "--task_kwargs", default=None, help="JSON, e.g. '{\"noise_std\": 0.5}' (default: the model's)."
    )
    parser.add_argument("--n_dims", type=int, default=None, help="Input dimension (default: the model's).")
    parser.add_argument("--n_points", type=int, default=None, help="Pairs per prompt (default: n_positions).")
    parser.add_argument("--n_prompts", type=int, default=1280, help="Prompts to evaluate on.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prompts and of the bootstrap.")
    parser.add_argument(
        "--ood", default=None, help=f"Distribution shift: {', '.join(OOD_KINDS)} (NAME or NAME=VALUE)."
    )
    parser.add_argument(
        "--eval_set", default=None, help="A fixed eval set: a folder or a Hub dataset REPO[:CONFIG]."
    )
    parser.add_argument("--batch_size", type=int, default=256, help="Prompts per forward pass.")
    parser.add_argument("--bootstrap_samples", type=int, default=1000, help="Bootstrap resamples.")
    parser.add_argument("--log_scale", action="store_true", help="Logarithmic error axis in the plot.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="Model forward precision (autocast).",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="No progress bars (they are shown only when stderr is a terminal).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=command_name("python -m icl_conml.evaluation", "icl_conml eval"),
        description="Error against the number of in-context examples, for a model and reference estimators. "
        "Use 'compare' as the first argument for the Table 5 comparison of two sets of models.",
    )
    parser.add_argument("--model", required=True, help="A training output_dir or a Hub id.")
    _common_arguments(parser)
    parser.add_argument("--threshold", type=float, default=0.1, help="Absolute error threshold ε.")
    parser.add_argument(
        "--relative_tolerance", type=float, default=0.1, help="'Within X of the best reference' (0.1 = 10%%)."
    )
    parser.add_argument(
        "--baselines",
        nargs="*",
        default=None,
        help="Reference estimators (name or name:key=value), default per task; none: --baselines with no value.",
    )
    return parser


def build_compare_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=command_name("python -m icl_conml.evaluation compare", "icl_conml compare"),
        description="The paper's Table 5: models A_i against B_i (paired by seed) on identical prompts.",
    )
    parser.add_argument(
        "--models", nargs="+", required=True, help="Models A (e.g. ConML runs, one per seed)."
    )
    parser.add_argument(
        "--against", nargs="+", required=True, help="Models B (e.g. plain ICL runs, same seeds)."
    )
    parser.add_argument("--labels", nargs=2, default=["A", "B"], metavar=("LABEL_A", "LABEL_B"))
    _common_arguments(parser)
    return parser


def _task_kwargs(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise EvaluationError(f"--task_kwargs {text!r} is not JSON; e.g. '{{\"noise_std\": 0.5}}'") from None
    if not isinstance(value, dict):
        raise EvaluationError("--task_kwargs must be a JSON object")
    return value


def _quiet_progress_bars() -> None:
    """The CLI shows its own bars (model forwards, estimators); weight-loading and dataset bars
    would clutter stderr."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


@entry_point(debug_alias=True)
def main(argv: list[str]) -> int:
    """``python -m icl_conml.evaluation [compare] ...`` (``icl_conml eval`` / ``icl_conml compare``)."""
    _quiet_progress_bars()
    comparing = bool(argv) and argv[0] == "compare"
    args = (build_compare_parser() if comparing else build_parser()).parse_args(
        argv[1:] if comparing else argv
    )
    common = {
        "task": args.task,
        "n_dims": args.n_dims,
        "n_points": args.n_points,
        "n_prompts": args.n_prompts,
        "seed": args.seed,
        "ood": args.ood,
        "eval_set": args.eval_set,
        "batch_size": args.batch_size,
        "bootstrap_samples": args.bootstrap_samples,
        "device": args.device,
        "dtype": args.dtype,
        "progress": False if args.quiet else None,
    }
    common["task_kwargs"] = _task_kwargs(args.task_kwargs)
    if comparing:
        result = compare_models(args.models, args.against, labels=tuple(args.labels), **common)
        out = write_comparison(result, args.output_dir, args.log_scale)
        print(comparison_table(result))
        print(f"wrote {out / 'compare.json'}, compare.md" + (", compare.png" * is_available("matplotlib")))
    else:
        results = evaluate_model(
            args.model,
            threshold=args.threshold,
            relative_tolerance=args.relative_tolerance,
            baselines=args.baselines,
            **common,
        )
        for note in results["metadata"]["notes"]:
            print(f"icl_conml: note: {note}", file=sys.stderr)
        out = write_results(results, args.output_dir, args.log_scale)
        print(results_table(results))
        print(f"wrote {out / 'results.json'}, results.md" + (", curves.png" * is_available("matplotlib")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
