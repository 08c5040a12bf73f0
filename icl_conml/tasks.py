"""Function classes for in-context learning (Garg et al. 2022).

A function class samples task parameters (one function per prompt) and evaluates them on
inputs. Everything is drawn from an explicit ``torch.Generator`` so that a batch is a pure
function of its seed. Parameters are a ``dict[str, Tensor]`` whose tensors all have the
number of tasks as their leading dimension, so a finite task pool is plain indexing.

Scalings follow Garg et al.: inputs are ``x ~ N(0, I_d)`` and, where the class allows it,
``E[y^2]`` is about ``d``; each class states the normaliser that turns a squared error into
the error reported in the literature (``error_normaliser``).

Curriculum (Garg et al.): early in training only the first ``active_dims`` input coordinates
are non-zero (the data zeroes the others). ``sample_params(..., active_dims)`` lets a class
draw its tasks among the active coordinates where that matters (sparse supports, tree split
features); for the linear, quadratic and ReLU classes it changes nothing, since a weight on an
inactive coordinate multiplies x = 0. With ``active_dims`` None or ``n_dims`` every class
makes exactly the generator calls it always made, so data without a curriculum is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F

from .registry import Registry, import_path

Params = dict[str, torch.Tensor]
TaskT = TypeVar("TaskT", bound="type[FunctionClass]")

#: Every function class by name (built-ins and ``@register_task`` classes); a recipe may also
#: name one by import path (``registry.Registry.resolve``).
TASKS: Registry[type[FunctionClass]] = Registry(
    "task",
    lambda obj: _is_concrete_function_class(obj),
    "a FunctionClass subclass that implements sample_params and evaluate",
)


def _is_concrete_function_class(obj: object) -> bool:
    """A ``FunctionClass`` subclass with its own ``sample_params`` and ``evaluate`` (the base's
    raise ``NotImplementedError``: naming the base itself must be a one-line error, not a traceback)."""
    return (
        isinstance(obj, type)
        and issubclass(obj, FunctionClass)
        and all(
            getattr(obj, method) is not getattr(FunctionClass, method)
            for method in ("sample_params", "evaluate")
        )
    )


def register_task(name: str) -> Callable[[TaskT], TaskT]:
    """Class decorator: make a ``FunctionClass`` available to recipes as ``task: name``."""

    def register(cls: TaskT) -> TaskT:
        TASKS.add(name, cls)
        cls.name = name
        return cls

    return register


def resolve_task_class(name: str, *, allow_import: bool = False) -> type[FunctionClass]:
    """The class ``name`` gives: a registry name or ``package.module:ClassName``, imported only
    with ``allow_import`` (a recipe or command line the user runs; ``trust_remote_code`` for a
    name read from a file): see ``registry.Registry.resolve``."""
    return TASKS.resolve(name, allow_import=allow_import)


def hyperparameter_names(cls: type[FunctionClass]) -> tuple[str, ...]:
    """A class's hyper-parameters: its dataclass fields after ``n_dims``."""
    return tuple(f.name for f in fields(cls) if f.init and f.name != "n_dims")


def task_reference(task: FunctionClass) -> str:
    """How a model config records its task so that it can be rebuilt in another process: the
    registry name for the package's classes, ``module:ClassName`` for a user's (importing the
    module registers it again)."""
    cls = type(task)
    if cls.__module__ == __name__ or ":" in task.name:
        return task.name
    return import_path(cls)


@dataclass
class FunctionClass:
    """Base class of a function class; a new one is one file (``docs/extending.md``).

    Subclass it as a dataclass whose fields after ``n_dims`` are the hyper-parameters (their
    defaults are the only defaults, ``validate`` the only checks), implement ``sample_params``
    and ``evaluate``, and register it with ``@register_task("name")`` or name it in a recipe by
    import path (``task: my_module:MyTask``, hyper-parameters in ``task_kwargs``).
    """

    n_dims: int
    # Set by @register_task; an unregistered class named by import path gets that path.
    name: ClassVar[str] = ""
    # Reference estimators the evaluation runs by default next to a model of this class.
    default_baselines: ClassVar[tuple[str, ...]] = ("least_squares", "averaging", "knn")
    # Whether Garg et al.'s distribution shifts of x and w (evaluation --ood) apply.
    linear: ClassVar[bool] = False
    # Whether labels are signs (±1): a scaled shift (--ood scale_x/scale_y) leaves their error as is.
    sign_labels: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.n_dims < 1:
            raise ValueError(f"n_dims={self.n_dims} must be >= 1")
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` (one line: the value, the rule, the fix) for bad hyper-parameters."""

    def hyperparameters(self) -> dict[str, Any]:
        """The hyper-parameters (every dataclass field but ``n_dims``) with their values."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name != "n_dims"}

    def sample_params(
        self, n_tasks: int, generator: torch.Generator, active_dims: int | None = None
    ) -> Params:
        """Parameters of ``n_tasks`` tasks; ``active_dims``: the curriculum's current input
        dimension (the first ``active_dims`` coordinates of x are the non-zero ones; None = all)."""
        raise NotImplementedError

    def active(self, active_dims: int | None) -> int:
        """``active_dims`` checked, None meaning all ``n_dims`` coordinates."""
        if active_dims is None:
            return self.n_dims
        if not 1 <= active_dims <= self.n_dims:
            raise ValueError(f"active_dims={active_dims} must be between 1 and n_dims={self.n_dims}")
        return active_dims

    def evaluate(
        self, params: Params, xs: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """ys of shape (B, n) for xs of shape (B, n, d); ``generator`` draws label noise, if any."""
        raise NotImplementedError

    # ---- losses and errors -------------------------------------------------------------
    def loss(self, predictions: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Elementwise training loss (squared error unless the class says otherwise)."""
        return (predictions - ys).square()

    def error(self, predictions: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Elementwise evaluation error, already divided by ``error_normaliser``."""
        return (predictions - ys).square() / self.error_normaliser

    @property
    def error_normaliser(self) -> float:
        """Divides squared errors so that predicting zero scores about 1 (Garg et al.)."""
        return float(self.n_dims)

    def sample_xs(self, n_tasks: int, n_points: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n_tasks, n_points, self.n_dims, generator=generator)


@register_task("linear_regression")
@dataclass
class LinearRegression(FunctionClass):
    """y = w·x with w ~ N(0, I_d), so E[y^2] = d.

    Under a curriculum w is drawn over all ``n_dims`` coordinates whatever ``active_dims``: the
    weights of inactive coordinates multiply x = 0, so the function on the data is the same as
    if only the active ones had been drawn (as in Garg et al.'s code). The same holds for the
    noisy, classification and quadratic subclasses and for ``Relu2NN``.
    """

    linear: ClassVar[bool] = True

    def sample_params(
        self, n_tasks: int, generator: torch.Generator, active_dims: int | None = None
    ) -> Params:
        self.active(active_dims)
        return {"w": torch.randn(n_tasks, self.n_dims, generator=generator)}

    def evaluate(
        self, params: Params, xs: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.einsum("bnd,bd->bn", xs, params["w"].to(xs.dtype))


@register_task("sparse_linear_regression")
@dataclass
class SparseLinearRegression(LinearRegression):
    """Linear regression whose w has exactly ``sparsity`` non-zero coordinates.

    Under a curriculum the support is drawn among the ``active_dims`` active coordinates (all of
    them if ``sparsity`` > ``active_dims``), as Garg et al.'s ``valid_coords``: a support drawn
    from all ``n_dims`` would leave most early tasks with fewer than ``sparsity`` effective
    weights, many with none (y ≡ 0). The support is the ``sparsity`` active coordinates of
    lowest random key; the keys (and w) are drawn over all ``n_dims``, so the generator calls
    do not depend on ``active_dims``.
    """

    default_baselines: ClassVar[tuple[str, ...]] = ("lasso", "least_squares", "averaging", "knn")

    sparsity: int = 3

    def validate(self) -> None:
        if not 1 <= self.sparsity <= self.n_dims:
            raise ValueError(
                f"sparsity={self.sparsity} must be between 1 and n_dims={self.n_dims}: lower sparsity or raise n_dims"
            )

    def sample_params(
        self, n_tasks: int, generator: torch.Generator, active_dims: int | None = None
    ) -> Params:
        active = self.active(active_dims)
        w = torch.randn(n_tasks, self.n_dims, generator=generator)
        keys = torch.rand(n_tasks, self.n_dims, generator=generator)
        keys[:, active:] = 2.0  # above every key in [0, 1): inactive coordinates rank last
        ranks = keys.argsort(dim=1).argsort(dim=1)
        return {"w": w * (ranks < min(self.sparsity, active))}

    @property
    def error_normaliser(self) -> float:
        return float(self.sparsity)


@register_task("noisy_linear_regression")
@dataclass
class NoisyLinearRegression(LinearRegression):
    """y = w·x + noise_std · ε. The Bayes-optimal estimator is ridge with α = noise_std²."""

    default_baselines: ClassVar[tuple[str, ...]] = ("ridge", "least_squares", "averaging", "knn")

    noise_std: float = 0.5

    def validate(self) -> None:
        if self.noise_std < 0:
            raise ValueError(f"noise_std={self.noise_std} must be >= 0")

    def evaluate(
        self, params: Params, xs: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        clean = super().evaluate(params, xs)
        noise = torch.randn(clean.shape, generator=generator).to(device=clean.device, dtype=clean.dtype)
        return clean + self.noise_std * noise


@register_task("linear_classification")
@dataclass
class LinearClassification(LinearRegression):
    """y = sign(w·x) in {-1, +1}; trained with logistic loss, evaluated by 0-1 error."""

    sign_labels: ClassVar[bool] = True

    def evaluate(
        self, params: Params, xs: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.where(super().evaluate(params, xs) >= 0, 1.0, -1.0).to(xs.dtype)

    def loss(self, predictions: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(predictions, (ys + 1) / 2, reduction="none")

    def error(self, predictions: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return (torch.sign(predictions) != torch.sign(ys)).to(predictions.dtype)

    @property
    def error_normaliser(self) -> float:
        return 1.0


@register_task("quadratic_regression")
@dataclass
class QuadraticRegression(LinearRegression):
    """y = w·(x ⊙ x) / √3, so E[y^2] = d as for linear regression."""

    linear: ClassVar[bool] = False

    def evaluate(
        self, params: Params, xs: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return super().evaluate(params, xs.square()) / math.sqrt(3)


@register_task("relu_2nn")
@dataclass
class Relu2NN(FunctionClass):
    """Two-layer ReLU network y = √(2/h) · W2ᵀ relu(W1ᵀ x), weights N(0, 1), so E[y^2] = d."""

    default_baselines: ClassVar[tuple[str, ...]] = ("mlp_gd", "least_squares", "averaging", "knn")

    hidden_size: int = 100

    def validate(self) -> None:
        if self.hidden_size < 1:
            raise ValueError(f"hidden_size={self.hidden_size} must be >= 1")

    def sample_params(
        self, n_tasks: int, generator: torch.Generator, active_dims: int | None = None
    ) -> Params:
        self.active(active_dims)  # rows of w1 on inactive coordinates multiply x = 0: no effect
        w1 = torch.randn(n_tasks, self.n_dims, self.hidden_size, generator=generator)
        w2 = torch.randn(n_tasks, self.hidden_size, generator=generator)
        return {"w1": w1, "w2": w2}

    def evaluate(
        self, params: Params, xs: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        hidden = torch.relu(torch.einsum("bnd,bdh->bnh", xs, params["w1"].to(xs.dtype)))
        scale = math.sqrt(2 / self.hidden_size)
        return scale * torch.einsum("bnh,bh->bn", hidden, params["w2"].to(xs.dtype))


@register_task("decision_tree")
@dataclass
class DecisionTree(FunctionClass):
    """Full binary tree of ``depth``: node i tests x[feature_i] > 0; leaves hold N(0, 1) values.

    Under a curriculum the split features are drawn among the ``active_dims`` active
    coordinates. This differs from Garg et al.'s code, which draws them from all ``n_dims``
    (its ``valid_coords`` is passed to sparse regression only): there a split on a zeroed
    coordinate always sends x the same way, so early in the curriculum most trees are much
    shallower than ``depth`` (at 5 of 20 dimensions a node splits on live data 1 time in 4):
    at step 0 of ``recipes/decision_tree.yaml`` 31% of prompts had a constant y and a prompt
    reached 2.2 of the 16 leaves on average, against 0% and 7.9 with the active coordinates
    (``benchmarks/curriculum_tasks.py``). Drawing among the active coordinates gives every
    stage trees of the stated depth; at ``active_dims`` = ``n_dims`` both agree.
    """

    default_baselines: ClassVar[tuple[str, ...]] = (
        "decision_tree",
        "gradient_boosting",
        "least_squares",
        "averaging",
        "knn",
    )

    depth: int = 4

    def validate(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth={self.depth} must be >= 1")

    def sample_params(
        self, n_tasks: int, generator: torch.Generator, active_dims: int | None = None
    ) -> Params:
        n_internal = 2**self.depth - 1
        features = torch.randint(0, self.active(active_dims), (n_tasks, n_internal), generator=generator)
        leaves = torch.randn(n_tasks, 2**self.depth, generator=generator)
        return {"features": features, "leaves": leaves}

    def evaluate(
        self, params: Params, xs: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        features = params["features"]
        node = torch.zeros(xs.shape[:2], dtype=torch.long, device=xs.device)
        for _ in range(self.depth):
            feature = torch.gather(features, 1, node)
            go_right = torch.gather(xs, 2, feature.unsqueeze(-1)).squeeze(-1) > 0
            node = 2 * node + 1 + go_right.long()
        leaf = node - (2**self.depth - 1)
        return torch.gather(params["leaves"].to(xs.dtype), 1, leaf)

    @property
    def error_normaliser(self) -> float:
        return 1.0


def get_task(name: str, n_dims: int, *, allow_import: bool = False, **kwargs: Any) -> FunctionClass:
    """Build a function class by registry name or import path (imported only with
    ``allow_import``: see ``resolve_task_class``); keyword arguments that are not
    hyper-parameters of the class are ignored (recipes carry every built-in's flat keys)."""
    cls = resolve_task_class(name, allow_import=allow_import)
    accepted = hyperparameter_names(cls)
    task = cls(n_dims=n_dims, **{key: value for key, value in kwargs.items() if key in accepted})
    if name not in TASKS:
        task.name = name  # an import path names the class wherever it is used (config, evaluation)
    return task


def index_params(params: Params, index: torch.Tensor) -> Params:
    """Select tasks from a parameter dict (used for finite task pools)."""
    return {key: value[index] for key, value in params.items()}
