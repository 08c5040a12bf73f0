"""Fresh evaluation prompts and Garg et al.'s distribution shifts (``--ood``), drawn through
``data.Prompts.sample`` from the evaluation's own RNG stream."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data import EVALUATION_STREAM, Prompts, PromptShift
from ..tasks import TASK_REGISTRY, FunctionClass, Params
from .arguments import OOD_KINDS, EvaluationError

__all__ = ["OOD_KINDS", "OODShift", "Prompts", "parse_ood", "sample_prompts"]

_OOD_DEFAULT_VALUES = {"noisy_y": 1.0}
_OOD_NEEDS_VALUE = ("scale_x", "scale_y")


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
        if self.kind not in _OOD_NEEDS_VALUE or task.name == "linear_classification":
            return 1.0
        return float(self.value) ** 2


def parse_ood(spec: str | None) -> OODShift | None:
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
        low = 0.0 if kind == "noisy_y" else OOD_VALUE_RANGE[0]
        if not (math.isfinite(number) and low <= number <= OOD_VALUE_RANGE[1]):
            raise EvaluationError(
                f"--ood {spec!r}: the value must be between {low:g} and {OOD_VALUE_RANGE[1]:g} (larger ones "
                f"overflow float32 prompts and errors; Garg et al. use 0.333 … 3)"
            )
    return OODShift(kind, number)


#: Factors and noise beyond this range make float32 prompts, labels or squared errors overflow.
OOD_VALUE_RANGE = (1e-6, 1e6)


def error_scale(task: FunctionClass, ood: str | None) -> float:
    """What the errors on prompts of the shift ``ood`` are divided by (see ``OODShift.error_scale``)."""
    shift = parse_ood(ood)
    return 1.0 if shift is None else shift.error_scale(task)


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
    return Prompts.sample(task, n_prompts, n_points, seed, EVALUATION_STREAM, shift)
