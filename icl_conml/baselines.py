"""Reference estimators for in-context learning curves, vectorised over prompts.

Every estimator has the interface of the model: given ``xs`` (B, n, d) and ``ys`` (B, n) it
returns predictions (B, n) where column k predicts the label of the k-th query from the k
pairs before it, ``(xs[:, :k], ys[:, :k])``, and nothing else. The query is ``xs[:, k]``
unless ``queries`` (B, n, d) gives another one per k (used by the out-of-distribution
prompts whose query differs from the next in-context input). With no example (k = 0) every
estimator predicts 0, as in Garg et al. (2022).

Linear estimators work on the prefix statistics ``G_k = Σ_{i<k} x_i x_iᵀ`` and
``c_k = Σ_{i<k} y_i x_i`` (one cumulative sum), so ridge, averaging and Lasso fit every
prefix of every prompt in one batched solve. Least squares solves one batched k×k system
per k below d and every longer prefix at once; k-nearest neighbours uses one masked distance matrix. Trees and gradient
boosting come from scikit-learn (the optional ``trees`` extra), one fit per prompt and
prefix: scikit-learn has no batched fit, so those are the slow ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import UserError
from .registry import Registry, takes_positional
from .tasks import FunctionClass

Estimator = Callable[..., torch.Tensor]


class BaselineError(UserError, ValueError):
    """A bad estimator specification or a missing optional dependency (one line, exit 2)."""


# ---- shared pieces --------------------------------------------------------------------------------
def _queries(xs: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor:
    return xs if queries is None else queries


def prefix_statistics(xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``G`` (B, n, d, d) and ``c`` (B, n, d): sums over the pairs strictly before each position."""
    outer = xs.unsqueeze(-1) * xs.unsqueeze(-2)
    gram = outer.cumsum(dim=1) - outer
    moment = (ys.unsqueeze(-1) * xs).cumsum(dim=1) - ys.unsqueeze(-1) * xs
    return gram, moment


# ---- linear estimators ------------------------------------------------------------------------------
def least_squares(xs: torch.Tensor, ys: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
    """Minimum-norm least squares on each prefix (float64).

    Below d examples the minimum-norm solution is ``Xᵀ(XXᵀ)⁻¹y`` (a k×k solve per k); from d
    on it is the unique solution of ``G_k w = c_k``, solved for every prefix at once. A prefix
    whose system is singular (repeated inputs) falls back to ``lstsq`` with the SVD driver.
    """
    qs = _queries(xs, queries).double()
    x, y = xs.double(), ys.double()
    batch, n_points, n_dims = x.shape
    w = torch.zeros(batch, n_points, n_dims, dtype=torch.float64)
    for k in range(1, min(n_dims, n_points)):
        context = x[:, :k]
        dual, info = torch.linalg.solve_ex(context @ context.mT, y[:, :k, None])
        w[:, k] = (context.mT @ dual).squeeze(-1)
        _refit_singular(w[:, k], info, context, y[:, :k])
    if n_points > n_dims:
        gram, moment = prefix_statistics(x, y)
        solution, info = torch.linalg.solve_ex(gram[:, n_dims:], moment[:, n_dims:, :, None])
        w[:, n_dims:] = solution.squeeze(-1)
        for k in range(n_dims, n_points):
            _refit_singular(w[:, k], info[:, k - n_dims], x[:, :k], y[:, :k])
    return (qs * w).sum(-1).to(ys.dtype)


def _refit_singular(w: torch.Tensor, info: torch.Tensor, context: torch.Tensor, labels: torch.Tensor) -> None:
    """Replace, in place, the rows of ``w`` whose solve failed by the SVD least-squares solution."""
    failed = info.nonzero().flatten()
    if failed.numel():
        fit = torch.linalg.lstsq(context[failed], labels[failed, :, None], driver="gelsd").solution
        w[failed] = fit.squeeze(-1)


def ridge(
    xs: torch.Tensor, ys: torch.Tensor, queries: torch.Tensor | None = None, alpha: float = 1.0
) -> torch.Tensor:
    """Ridge regression ``(G_k + αI)⁻¹ c_k`` on every prefix at once.

    With w ~ N(0, I) and label noise N(0, σ²) this is the Bayes posterior mean for α = σ².
    """
    if alpha <= 0:
        raise BaselineError(f"ridge alpha={alpha} must be > 0 (use least_squares for alpha = 0)")
    gram, moment = prefix_statistics(xs.double(), ys.double())
    eye = torch.eye(xs.shape[-1], dtype=torch.float64)
    w = torch.linalg.solve(gram + alpha * eye, moment.unsqueeze(-1)).squeeze(-1)  # (B, n, d)
    return (_queries(xs, queries).double() * w).sum(-1).to(ys.dtype)


def averaging(xs: torch.Tensor, ys: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
    """Garg et al.'s averaging estimator: ŵ = mean of y_i x_i over the prefix."""
    moment = (ys.unsqueeze(-1) * xs).cumsum(dim=1) - ys.unsqueeze(-1) * xs
    w = moment / torch.arange(xs.shape[1], dtype=xs.dtype).clamp(min=1)[None, :, None]  # k examples before k
    return (_queries(xs, queries) * w).sum(-1)


def nearest_neighbours(
    xs: torch.Tensor, ys: torch.Tensor, queries: torch.Tensor | None = None, n_neighbors: int = 3
) -> torch.Tensor:
    """k-nearest neighbours with uniform weights (Garg et al.: k = 3) over the prefix.

    With fewer than ``n_neighbors`` examples it averages all of them.
    """
    if n_neighbors < 1:
        raise BaselineError(f"knn n_neighbors={n_neighbors} must be >= 1")
    n_points = xs.shape[1]
    distances = torch.cdist(_queries(xs, queries).double(), xs.double())  # [b, k, i] = |q_k - x_i|
    later = torch.ones(n_points, n_points, dtype=torch.bool).triu()  # i >= k is not before k
    distances = distances.masked_fill(later, math.inf)
    nearest = distances.topk(min(n_neighbors, n_points), dim=-1, largest=False)
    valid = torch.isfinite(nearest.values)
    neighbour_ys = torch.gather(ys.unsqueeze(1).expand(-1, n_points, -1), 2, nearest.indices)
    total = (neighbour_ys * valid).sum(-1)
    return total / valid.sum(-1).clamp(min=1)


def lasso(
    xs: torch.Tensor,
    ys: torch.Tensor,
    queries: torch.Tensor | None = None,
    alpha: float = 0.01,
    n_iter: int = 1000,
    tol: float = 1e-7,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Lasso ``min (1/2k)|Xw − y|² + α|w|₁`` (scikit-learn's scaling) by batched FISTA.

    Runs on the prefix statistics, so every prefix of every prompt is one row of a batch; rows
    go in chunks of ``chunk_size`` (small enough to stay in cache across iterations), each
    until no coefficient moves by more than ``tol`` (checked every 25 iterations).
    """
    if alpha <= 0:
        raise BaselineError(f"lasso alpha={alpha} must be > 0")
    batch, n_points, n_dims = xs.shape
    gram, moment = prefix_statistics(xs.double(), ys.double())
    k = torch.arange(n_points, dtype=torch.float64).clamp(min=1)[None, :, None]  # examples before k
    gram = (gram / k.unsqueeze(-1)).reshape(-1, n_dims, n_dims)
    moment = (moment / k).reshape(-1, n_dims)
    w = torch.cat(
        [
            _fista(gram[i : i + chunk_size], moment[i : i + chunk_size], alpha, n_iter, tol)
            for i in range(0, gram.shape[0], chunk_size)
        ]
    ).reshape(batch, n_points, n_dims)
    return (_queries(xs, queries).double() * w).sum(-1).to(ys.dtype)


def _fista(gram: torch.Tensor, moment: torch.Tensor, alpha: float, n_iter: int, tol: float) -> torch.Tensor:
    """FISTA for ``½ wᵀGw − cᵀw + α|w|₁`` on a batch of (G, c), step 1/λ_max(G), with the
    gradient-based adaptive restart of O'Donoghue & Candès (2015) per row (ill-conditioned
    prefixes, k ≈ d, converge much faster with it)."""
    step = 1.0 / torch.linalg.eigvalsh(gram)[:, -1:].clamp(min=1e-12)
    w = torch.zeros_like(moment)
    z, t = w.clone(), torch.ones_like(step)
    for iteration in range(n_iter):
        u = z - step * (torch.bmm(gram, z.unsqueeze(-1)).squeeze(-1) - moment)
        w_next = u.sign() * (u.abs() - step * alpha).clamp(min=0)
        restart = ((z - w_next) * (w_next - w)).sum(-1, keepdim=True) > 0
        t = torch.where(restart, torch.ones_like(t), t)
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        z = w_next + ((t - 1) / t_next) * (w_next - w)
        converged = iteration % 25 == 24 and bool((w_next - w).abs().max() <= tol)
        w, t = w_next, t_next
        if converged:
            break
    return w


# ---- non-linear estimators -----------------------------------------------------------------------------
def mlp_gd(
    xs: torch.Tensor,
    ys: torch.Tensor,
    queries: torch.Tensor | None = None,
    hidden_size: int = 100,
    steps: int = 100,
    lr: float = 5e-3,
    seed: int = 0,
) -> torch.Tensor:
    """A 2-layer ReLU network per prompt fitted by full-batch Adam on each prefix (Garg's "2-layer NN, GD").

    All prompts train at once: their parameters are stacked along the batch and the summed
    loss keeps their gradients (and Adam's per-coordinate updates) independent.
    """
    qs = _queries(xs, queries)
    batch, n_points, n_dims = xs.shape
    generator = torch.Generator().manual_seed(seed)
    predictions = torch.zeros(ys.shape, dtype=ys.dtype)
    bound1, bound2 = 1 / math.sqrt(n_dims), 1 / math.sqrt(hidden_size)
    for k in range(1, n_points):
        w1 = ((torch.rand(batch, n_dims, hidden_size, generator=generator) * 2 - 1) * bound1).requires_grad_()
        b1 = ((torch.rand(batch, 1, hidden_size, generator=generator) * 2 - 1) * bound1).requires_grad_()
        w2 = ((torch.rand(batch, hidden_size, 1, generator=generator) * 2 - 1) * bound2).requires_grad_()
        b2 = ((torch.rand(batch, 1, 1, generator=generator) * 2 - 1) * bound2).requires_grad_()
        params = [w1, b1, w2, b2]
        optimizer = torch.optim.Adam(params, lr=lr)

        def net(inputs: torch.Tensor, w1=w1, b1=b1, w2=w2, b2=b2) -> torch.Tensor:
            return (torch.relu(inputs @ w1 + b1) @ w2 + b2).squeeze(-1)

        context, labels = xs[:, :k].float(), ys[:, :k].float()
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = (net(context) - labels).square().mean(dim=1).sum()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            predictions[:, k] = net(qs[:, k : k + 1].float()).squeeze(-1).to(ys.dtype)
    return predictions


def _require_sklearn(name: str) -> None:
    if not sklearn_available():
        raise BaselineError(
            f"the {name} baseline needs scikit-learn, which is not installed; "
            f"pip install 'icl_conml[trees]' or choose other --baselines"
        )


def _sklearn_per_prompt(
    make: Callable[[], Any], xs: torch.Tensor, ys: torch.Tensor, queries: torch.Tensor | None
) -> torch.Tensor:
    qs = _queries(xs, queries).double().numpy()
    xs_np, ys_np = xs.double().numpy(), ys.double().numpy()
    predictions = torch.zeros(ys.shape, dtype=torch.float64)
    for b in range(xs.shape[0]):  # scikit-learn fits one dataset at a time
        for k in range(1, xs.shape[1]):
            estimator = make().fit(xs_np[b, :k], ys_np[b, :k])
            predictions[b, k] = float(estimator.predict(qs[b, k : k + 1])[0])
    return predictions.to(ys.dtype)


def decision_tree(
    xs: torch.Tensor, ys: torch.Tensor, queries: torch.Tensor | None = None, max_depth: int = 4
) -> torch.Tensor:
    """Greedy tree learning (scikit-learn ``DecisionTreeRegressor``; Garg et al. use depth 4)."""
    _require_sklearn("decision_tree")
    from sklearn.tree import DecisionTreeRegressor

    return _sklearn_per_prompt(
        lambda: DecisionTreeRegressor(max_depth=max_depth, random_state=0), xs, ys, queries
    )


def gradient_boosting(
    xs: torch.Tensor,
    ys: torch.Tensor,
    queries: torch.Tensor | None = None,
    n_estimators: int = 100,
    max_depth: int = 3,
    learning_rate: float = 0.1,
) -> torch.Tensor:
    """Gradient-boosted trees (scikit-learn ``GradientBoostingRegressor``; Garg et al. use XGBoost)."""
    _require_sklearn("gradient_boosting")
    from sklearn.ensemble import GradientBoostingRegressor

    def make() -> Any:
        return GradientBoostingRegressor(
            n_estimators=n_estimators, max_depth=max_depth, learning_rate=learning_rate, random_state=0
        )

    return _sklearn_per_prompt(make, xs, ys, queries)


# ---- registry ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaselineSpec:
    """A named estimator with its settings; ``max_prompts`` caps the prompts a slow one sees."""

    name: str
    function: Estimator
    kwargs: dict[str, Any] = field(default_factory=dict)
    max_prompts: int | None = None
    needs_sklearn: bool = False

    def __call__(
        self, xs: torch.Tensor, ys: torch.Tensor, queries: torch.Tensor | None = None
    ) -> torch.Tensor:
        with torch.no_grad():
            return self.function(xs, ys, queries, **self.kwargs)


#: The estimators by name, with their options: ``needs_sklearn`` and ``max_prompts`` (scikit-learn
#: fits one prompt and prefix at a time: by default the slowest sees fewer prompts).
BASELINES: Registry[Estimator] = Registry(
    "baseline", takes_positional(3), "an estimator f(xs, ys, queries=None, **options)"
)


def register_baseline(
    name: str,
    needs_sklearn: bool = False,
    max_prompts: int | None = None,
    task_options: Callable[[FunctionClass], dict[str, Any]] | None = None,
) -> Callable[[Estimator], Estimator]:
    """Register an estimator ``f(xs, ys, queries=None, **options) -> predictions (B, n)`` as
    ``--baselines name[:option=value...]`` (an unregistered one is named by import path,
    ``--baselines package.module:function[:option=value...]``). ``task_options(task)`` gives
    defaults of its options for the evaluated function class. A function class lists the ones
    that fit it in its ``default_baselines``; any registered one can be asked for by name."""
    return BASELINES.register(
        name, needs_sklearn=needs_sklearn, max_prompts=max_prompts, task_options=task_options
    )


def _bayes_ridge(task: FunctionClass) -> dict[str, Any]:
    """Ridge's α = noise_std² (the Bayes posterior mean) on a class with label noise."""
    noise_std = getattr(task, "noise_std", 0)
    return {"alpha": float(noise_std) ** 2} if noise_std > 0 else {}


register_baseline("least_squares")(least_squares)
register_baseline("ridge", task_options=_bayes_ridge)(ridge)
register_baseline("averaging")(averaging)
register_baseline("knn")(nearest_neighbours)
register_baseline("lasso")(lasso)
register_baseline("mlp_gd")(mlp_gd)
register_baseline("decision_tree", needs_sklearn=True)(decision_tree)
register_baseline("gradient_boosting", needs_sklearn=True, max_prompts=256)(gradient_boosting)


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_baseline(spec: str, task: FunctionClass | None = None) -> BaselineSpec:
    """``name`` or ``name:key=value[:key=value]``, e.g. ``lasso:alpha=0.1`` or ``knn:n_neighbors=5``;
    ``name`` may be an import path ``package.module:function`` (the user's own, imported here and
    checked to be an estimator before it is called).

    ``ridge`` defaults to α = noise_std² (the Bayes posterior mean) on noisy linear regression.
    ``max_prompts=N`` limits how many prompts the estimator is evaluated on.
    """
    name, *options = spec.split(":")
    if options and "=" not in options[0] and name not in BASELINES:  # package.module:function, options
        name, options = f"{name}:{options[0]}", options[1:]
    try:
        function = BASELINES.resolve(name, allow_import=True)
    except ValueError as error:
        raise BaselineError(str(error).splitlines()[0]) from None
    registered = BASELINES.options(name)
    kwargs: dict[str, Any] = {}
    if task is not None and registered.get("task_options") is not None:
        kwargs.update(registered["task_options"](task))
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise BaselineError(f"baseline option {option!r} in {spec!r} must look like key=value")
        kwargs[key] = _parse_value(value)
    max_prompts = kwargs.pop("max_prompts", registered.get("max_prompts"))
    import inspect

    accepted = set(inspect.signature(function).parameters) - {"xs", "ys", "queries"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise BaselineError(
            f"baseline {name!r} has no option {unknown[0]!r}; it accepts {', '.join(sorted(accepted)) or 'none'}"
            f" and max_prompts"
        )
    return BaselineSpec(spec, function, kwargs, max_prompts, registered.get("needs_sklearn", False))


def sklearn_available() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True
