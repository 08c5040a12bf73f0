"""Every prompt: the training sampler, fixed prompt sets, Garg et al.'s distribution shifts.

A training batch is a pure function of (seed, step). Every process generates the same *global*
batch for a step and keeps its own slice, so the data is identical whatever the number of
processes, gradient accumulation is a slice too, and resuming at step t needs no replay of steps
0..t-1. The ConML probe and view indices are drawn from the same step generator, so they are
shared by every process as well.

A fixed set (``Prompts``) is a pure function of (task, sizes, seed, stream, shift): the
training-time eval prompts, the evaluation's fresh prompts (``sample_prompts``, with the ``--ood``
shifts of ``parse_ood``) and the eval sets of ``eval_sets`` all come from ``Prompts.sample``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import conml
from .errors import UserError
from .tasks import TASKS, FunctionClass, Params, index_params

# Distinct streams derived from one seed: the same seed never feeds two purposes.
_TRAIN_STREAM, _POOL_STREAM, _EVAL_STREAM, _CONML_STREAM = 1, 2, 3, 4
#: The stream of the evaluation's fresh prompts (``sample_prompts``), used by no training purpose.
EVALUATION_STREAM = 5


def distinct_indices(pool_size: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct indices drawn uniformly from ``range(pool_size)`` (needs pool_size >= size).

    A permutation when the pool is at most 64 times the batch; for a larger pool (a permutation
    of 2^24 takes about 0.9 s) draws with replacement and redraws the repeats, which are rare.
    """
    if pool_size <= 64 * size:
        return torch.randperm(pool_size, generator=generator)[:size]
    index = torch.randint(0, pool_size, (size,), generator=generator)
    while True:
        ordered, order = index.sort(stable=True)
        repeat = torch.zeros(size, dtype=torch.bool)
        repeat[order[1:]] = ordered[1:] == ordered[:-1]  # every occurrence after the first
        if not repeat.any():
            return index
        index[repeat] = torch.randint(0, pool_size, (int(repeat.sum()),), generator=generator)


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A generator seeded by (seed, step, stream); well-separated for nearby values."""
    mixed = (seed * 1_000_003 + step * 7_919 + stream * 2_147_483_647) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


@dataclass(frozen=True)
class Schedule:
    """Garg et al.'s curriculum for one quantity: start, +inc every interval steps, up to end."""

    start: int
    end: int
    inc: int = 1
    interval: int = 2000

    def at(self, step: int) -> int:
        if self.interval <= 0 or self.inc == 0:
            return self.end
        return min(self.end, self.start + self.inc * (step // self.interval))


@dataclass(frozen=True)
class Curriculum:
    dims: Schedule
    points: Schedule

    @classmethod
    def constant(cls, n_dims: int, n_points: int) -> Curriculum:
        return cls(Schedule(n_dims, n_dims, 0, 0), Schedule(n_points, n_points, 0, 0))


@dataclass(frozen=True)
class ConMLSampling:
    """What the data pipeline must draw for ConML each step (see ``conml.sample_views``)."""

    num_probes: int
    views: str
    num_views: int
    subset_min: float
    subset_max: float


class PromptSampler:
    """Draws the global batch of step ``step`` and hands out per-process micro-batches.

    Under a curriculum, tasks are drawn among the active input coordinates
    (``FunctionClass.sample_params(..., active_dims)``), as Garg et al. do for sparse regression.

    With a finite task pool (``task_pool_size`` > 0) a batch holds distinct tasks whenever the
    pool has at least as many tasks as the global batch, as in Garg et al.'s code
    (``randperm(pool)[:batch]``); a smaller pool is sampled with replacement (Garg's batch would
    shrink to the pool). Pool batches carry each row's pool index as ``task_ids`` (LongTensor), so that
    ConML never counts a task against a copy of itself (``conml.conml_loss``).
    """

    def __init__(
        self,
        task: FunctionClass,
        curriculum: Curriculum,
        global_batch_size: int,
        seed: int,
        task_pool_size: int = 0,
        conml_sampling: ConMLSampling | None = None,
    ) -> None:
        self.task = task
        self.curriculum = curriculum
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.conml_sampling = conml_sampling
        self.task_pool_size = task_pool_size
        self._pool: tuple[int, Params] | None = None  # (active dims, pool) of the latest stage
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None

    def pool(self, active_dims: int) -> Params:
        """The task pool at curriculum dimension ``active_dims``.

        Every stage redraws it from the same pool generator, so its tasks keep their weights
        (linear w, sparse w and support keys, ReLU weights, tree leaves); only what depends on
        the active coordinates is drawn again among them: a sparse support (the lowest-key
        active coordinates) and a tree's split features. Without a curriculum it is drawn once.
        """
        if self._pool is None or self._pool[0] != active_dims:
            generator = step_generator(self.seed, 0, _POOL_STREAM)
            self._pool = (active_dims, self.task.sample_params(self.task_pool_size, generator, active_dims))
        return self._pool[1]

    def global_batch(self, step: int) -> dict[str, torch.Tensor]:
        """The whole batch of a step: xs (G, n, d), ys (G, n), ``task_ids`` (G,) with a task
        pool and, with ConML, probes and views."""
        generator = step_generator(self.seed, step, _TRAIN_STREAM)
        n_dims, n_points = self.curriculum.dims.at(step), self.curriculum.points.at(step)
        size = self.global_batch_size
        task_ids = None
        if self.task_pool_size == 0:
            params = self.task.sample_params(size, generator, active_dims=n_dims)
        else:
            if self.task_pool_size >= size:  # no task twice in one batch
                task_ids = distinct_indices(self.task_pool_size, size, generator)
            else:
                task_ids = torch.randint(0, self.task_pool_size, (size,), generator=generator)
            params = index_params(self.pool(n_dims), task_ids)
        xs = self.task.sample_xs(size, n_points, generator)
        xs[:, :, n_dims:] = 0  # curriculum: dimensions beyond the current one are zeroed
        batch = {"xs": xs, "ys": self.task.evaluate(params, xs, generator)}
        if task_ids is not None:
            batch["task_ids"] = task_ids
        if self.conml_sampling is not None:
            batch.update(self._conml_inputs(step, size, n_points, n_dims))
        return batch

    def _conml_inputs(self, step: int, size: int, n_points: int, n_dims: int) -> dict[str, torch.Tensor]:
        spec = self.conml_sampling
        generator = step_generator(self.seed, step, _CONML_STREAM)
        probes = conml.sample_probes(spec.num_probes, self.task.n_dims, generator)
        probes[:, n_dims:] = 0
        views = conml.sample_views(
            spec.views, size, n_points, spec.num_views, generator, spec.subset_min, spec.subset_max
        )
        # The probe is shared by the batch; it is repeated so that every tensor is split by row.
        return {"probes": probes.expand(size, -1, -1).contiguous(), "view_index": views}

    def micro_batch(self, step: int, part: int, num_parts: int) -> dict[str, torch.Tensor]:
        """Slice ``part`` of ``num_parts`` equal slices of the global batch of ``step``."""
        per_part = self.global_batch_size // num_parts
        if self._cached is None or self._cached[0] != step:  # micro-batches of one step share it
            self._cached = (step, self.global_batch(step))
        batch = self._cached[1]
        return {key: value[part * per_part : (part + 1) * per_part] for key, value in batch.items()}


class TrainingPrompts(torch.utils.data.Dataset):
    """Map-style view of the stream: item i is micro-batch i of this process.

    Map-style (rather than iterable) so that the Trainer's resume logic skips already-seen
    batches by index, without generating them.
    """

    def __init__(
        self,
        sampler: PromptSampler,
        max_steps: int,
        gradient_accumulation_steps: int,
        process_index: int,
        num_processes: int,
    ) -> None:
        if sampler.global_batch_size % (gradient_accumulation_steps * num_processes):
            raise ValueError(
                f"global batch {sampler.global_batch_size} is not divisible by "
                f"gradient_accumulation_steps × processes = {gradient_accumulation_steps} × {num_processes}"
            )
        self.sampler = sampler
        self.max_steps = max_steps
        self.accumulation = gradient_accumulation_steps
        self.process_index = process_index
        self.num_processes = num_processes

    def __len__(self) -> int:
        return self.max_steps * self.accumulation

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        step, micro = divmod(index, self.accumulation)
        parts = self.accumulation * self.num_processes
        return self.sampler.micro_batch(step, micro * self.num_processes + self.process_index, parts)


class PromptShift:
    """A change of the prompt distribution, applied by ``Prompts.sample`` (the evaluation's
    out-of-distribution shifts, ``OODShift``, are its subclasses).

    ``inputs`` runs after the task parameters and inputs are drawn and may change them and give
    separate queries (N, n, d); ``labels`` runs after the labels are computed. Both draw from
    the prompt generator, so a shifted set is a pure function of (task, sizes, seed, shift).
    """

    def inputs(
        self, task: FunctionClass, params: Params, xs: torch.Tensor, generator: torch.Generator
    ) -> tuple[Params, torch.Tensor, torch.Tensor | None]:
        return params, xs, None

    def labels(self, ys: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return ys

    def error_scale(self, task: FunctionClass) -> float:
        """What errors are divided by on top of the task's normaliser (1: none)."""
        return 1.0


@dataclass(eq=False)
class Prompts(torch.utils.data.Dataset):
    """A fixed set of prompts: one item per prompt, ``{"xs", "ys"}`` (the Trainer's eval dataset
    during training); the evaluation package reads the tensors directly.

    ``queries`` (N, n, d), when given, replace ``xs[:, k]`` as the k-th query (targets
    ``query_ys``); errors are divided by ``error_scale`` on top of the task's normaliser (scaled
    prompts are normalised back so that predicting 0 still scores about 1).
    """

    xs: torch.Tensor
    ys: torch.Tensor
    queries: torch.Tensor | None = None
    query_ys: torch.Tensor | None = None
    error_scale: float = 1.0

    @classmethod
    def sample(
        cls,
        task: FunctionClass,
        n_prompts: int,
        n_points: int,
        seed: int,
        stream: int = _EVAL_STREAM,
        shift: PromptShift | None = None,
    ) -> Prompts:
        """``n_prompts`` prompts of ``task`` from the generator of (seed, 0, stream): one function
        per prompt, then its inputs and labels (``shift`` hooks in between, see ``PromptShift``)."""
        generator = step_generator(seed, 0, stream)
        params = task.sample_params(n_prompts, generator)
        xs = task.sample_xs(n_prompts, n_points, generator)
        queries = None
        if shift is not None:
            params, xs, queries = shift.inputs(task, params, xs, generator)
        ys = task.evaluate(params, xs, generator)
        query_ys = None if queries is None else task.evaluate(params, queries, generator)
        if shift is not None:
            ys = shift.labels(ys, generator)
        return cls(xs, ys, queries, query_ys, 1.0 if shift is None else shift.error_scale(task))

    @property
    def targets(self) -> torch.Tensor:
        """The label of each query: ``query_ys`` when the queries are separate, else ``ys``."""
        return self.ys if self.query_ys is None else self.query_ys

    def __len__(self) -> int:
        return self.xs.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"xs": self.xs[index], "ys": self.ys[index]}


# ---- Garg et al.'s distribution shifts (the evaluation's --ood) and fresh evaluation prompts ----------------

OOD_KINDS = ("scale_x", "scale_y", "noisy_y", "skewed", "orthant", "orthogonal_query", "repeated_query")
#: Factors and noise beyond this range make float32 prompts, labels or squared errors overflow.
OOD_VALUE_RANGE = (1e-6, 1e6)
_OOD_DEFAULT_VALUES = {"noisy_y": 1.0}
_OOD_NEEDS_VALUE = ("scale_x", "scale_y")


class PromptError(UserError, ValueError):
    """A user error in the prompts asked for (an ``--ood`` shift, or one the task cannot take):
    one line, exit 2. The evaluation reports it as its ``EvaluationError``, with the same message."""


@dataclass(frozen=True)
class OODShift(PromptShift):
    """One of ``OOD_KINDS`` with its value (a factor, a noise std, or None); see ``sample_prompts``."""

    kind: str
    value: float | None = None

    def inputs(
        self, task: FunctionClass, params: Params, xs: torch.Tensor, generator: torch.Generator
    ) -> tuple[Params, torch.Tensor, torch.Tensor | None]:
        kind, value, d = self.kind, self.value, task.n_dims
        n_prompts, n_points = xs.shape[:2]
        queries = None
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
        return params, xs, queries

    def labels(self, ys: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "noisy_y":
            return ys + self.value * torch.randn(ys.shape, generator=generator)
        return ys

    def error_scale(self, task: FunctionClass) -> float:
        """Scaled prompts are normalised back by the factor² (labels of a classifier are signs)."""
        if self.kind not in _OOD_NEEDS_VALUE or task.sign_labels:
            return 1.0
        return float(self.value) ** 2


def parse_ood(spec: str | None) -> OODShift | None:
    """``NAME`` or ``NAME=VALUE``: scale_x=3, scale_y=0.5, noisy_y=1.0, skewed, orthant, ...
    (``PromptError`` for an unknown name, a missing factor or a value out of range)."""
    if not spec:
        return None
    kind, sep, value = spec.partition("=")
    if kind not in OOD_KINDS:
        raise PromptError(f"unknown --ood {kind!r}; choose one of {', '.join(OOD_KINDS)}")
    if kind in _OOD_NEEDS_VALUE and not sep:
        raise PromptError(f"--ood {kind} needs a factor, e.g. --ood {kind}=3 (Garg et al.: 0.333 … 3)")
    number = _OOD_DEFAULT_VALUES.get(kind)
    if sep:
        try:
            number = float(value)
        except ValueError:
            raise PromptError(f"--ood {spec!r}: {value!r} is not a number") from None
        if number <= 0 and kind != "noisy_y" or number < 0:
            raise PromptError(f"--ood {spec!r}: the value must be positive")
        low = 0.0 if kind == "noisy_y" else OOD_VALUE_RANGE[0]
        if not (math.isfinite(number) and low <= number <= OOD_VALUE_RANGE[1]):
            raise PromptError(
                f"--ood {spec!r}: the value must be between {low:g} and {OOD_VALUE_RANGE[1]:g} (larger ones "
                f"overflow float32 prompts and errors; Garg et al. use 0.333 … 3)"
            )
    return OODShift(kind, number)


def ood_error_scale(task: FunctionClass, ood: str | None) -> float:
    """What the errors on prompts of the shift ``ood`` are divided by (see ``OODShift.error_scale``)."""
    shift = parse_ood(ood)
    return 1.0 if shift is None else shift.error_scale(task)


def sample_prompts(
    task: FunctionClass, n_prompts: int, n_points: int, seed: int, ood: str | None = None
) -> Prompts:
    """Fresh evaluation prompts of ``task`` drawn from ``seed`` on the evaluation's own stream
    (``EVALUATION_STREAM``), optionally with one of Garg et al.'s distribution shifts:

    - ``scale_x=c`` / ``scale_y=c``: inputs / weights (hence labels) multiplied by c.
    - ``noisy_y=σ``: N(0, σ²) noise added to every label.
    - ``skewed``: x ~ N(0, Σ), Σ with eigenvalues ∝ 1/i in a random basis, trace d.
    - ``orthant``: in-context inputs in one random orthant per prompt; queries from N(0, I).
    - ``orthogonal_query``: the k-th query is orthogonal to the k examples before it (same
      norm as x_k); prompts are cut to n_points ≤ d, where that is possible.
    - ``repeated_query``: the k-th query is one of the k examples before it.

    Shifts apply to linear function classes only (``PromptError`` otherwise).
    """
    shift = parse_ood(ood)
    if shift is not None and not task.linear:
        linear = ", ".join(name for name, cls in TASKS.items() if cls.linear)
        raise PromptError(f"--ood applies to linear function classes ({linear}), not {task.name!r}")
    return Prompts.sample(task, n_prompts, n_points, seed, EVALUATION_STREAM, shift)
