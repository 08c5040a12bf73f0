"""Reference estimators: each curve against theory where theory exists, else against scikit-learn.

Prompts are drawn from fixed seeds, so every check is deterministic; the prompt counts make
the Monte-Carlo error of each checked mean a few times smaller than its tolerance.
"""

import sys

import pytest
import torch

from icl_conml import baselines
from icl_conml.baselines import BaselineError, parse_baseline
from icl_conml.evaluation import EvaluationError, resolve_baselines
from icl_conml.tasks import get_task

D = 5


def draw(task_name: str, n_prompts: int, n_points: int, seed: int = 0, n_dims: int = D, **kwargs):
    task = get_task(task_name, n_dims, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    params = task.sample_params(n_prompts, generator)
    xs = task.sample_xs(n_prompts, n_points, generator)
    return task, xs, task.evaluate(params, xs, generator)


def curve(task, predictions, ys) -> torch.Tensor:
    return task.error(predictions.double(), ys.double()).mean(dim=0)


def test_least_squares_is_one_minus_k_over_d_then_zero_on_noiseless_regression():
    task, xs, ys = draw("linear_regression", 8000, 2 * D + 2)
    errors = curve(task, baselines.least_squares(xs, ys), ys)
    for k in range(D):
        assert errors[k].item() == pytest.approx(1 - k / D, abs=0.04), k
    assert errors[D:].max().item() < 1e-8


def test_least_squares_on_noisy_regression_follows_the_inverse_wishart_formula():
    # E[error at k] = σ²/d · (1 + d / (k − d − 1)) for k > d + 1 (x ~ N(0, I), ordinary least squares).
    sigma, n_points = 0.5, 30
    task, xs, ys = draw("noisy_linear_regression", 4000, n_points, noise_std=sigma)
    errors = curve(task, baselines.least_squares(xs, ys), ys)
    for k in range(D + 10, n_points):
        expected = sigma**2 / D * (1 + D / (k - D - 1))
        assert errors[k].item() == pytest.approx(expected, rel=0.08), k


def test_ridge_is_the_bayes_posterior_mean_on_noisy_regression():
    # With w ~ N(0, I) and noise σ², the posterior covariance is σ²(XᵀX + σ²I)⁻¹, so the Bayes
    # error at a fresh query is (tr Σ_post + σ²) / d given the context: checked prompt by prompt.
    sigma, n_points = 0.5, 12
    task, xs, ys = draw("noisy_linear_regression", 6000, n_points, noise_std=sigma)
    spec = parse_baseline("ridge", task)
    assert spec.kwargs == {"alpha": sigma**2}
    errors = curve(task, spec(xs, ys), ys)
    gram, _ = baselines.prefix_statistics(xs.double(), ys.double())
    posterior = sigma**2 * torch.linalg.inv(gram + sigma**2 * torch.eye(D, dtype=torch.float64))
    bayes = ((posterior.diagonal(dim1=-2, dim2=-1).sum(-1) + sigma**2) / D).mean(0)
    for k in range(n_points):
        assert errors[k].item() == pytest.approx(bayes[k].item(), rel=0.06), k
    least_squares = curve(task, baselines.least_squares(xs, ys), ys)
    assert (errors <= least_squares + 0.01).all()  # Bayes-optimal: never worse than least squares
    assert errors[D].item() < 0.5 * least_squares[D].item()  # least squares blows up at k = d


def test_ridge_with_vanishing_alpha_is_least_squares_once_determined():
    task, xs, ys = draw("linear_regression", 200, 2 * D)
    ridge = baselines.ridge(xs.double(), ys.double(), alpha=1e-10)
    least_squares = baselines.least_squares(xs.double(), ys.double())
    torch.testing.assert_close(ridge[:, D + 1 :], least_squares[:, D + 1 :], atol=1e-6, rtol=1e-6)


def test_averaging_is_d_plus_one_over_k():
    # ŵ = (1/k) Σ x_i x_iᵀ w: E|ŵ − w|² = (d + 1)|w|² / k, so the normalised error is (d + 1) / k.
    task, xs, ys = draw("linear_regression", 40000, 13)
    errors = curve(task, baselines.averaging(xs, ys), ys)
    assert errors[0].item() == pytest.approx(1.0, abs=0.03)
    for k in range(2, 13):
        assert errors[k].item() == pytest.approx((D + 1) / k, rel=0.08), k


def test_knn_averages_all_examples_until_it_has_three():
    # With k ≤ 3 examples the prediction is their mean ȳ: E(ȳ − y)² / d = 1 + 1/k.
    task, xs, ys = draw("linear_regression", 8000, 8)
    errors = curve(task, baselines.nearest_neighbours(xs, ys), ys)
    assert errors[0].item() == pytest.approx(1.0, abs=0.04)
    for k in (1, 2, 3):
        assert errors[k].item() == pytest.approx(1 + 1 / k, rel=0.05), k


def test_estimators_agree_with_scikit_learn():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.linear_model import Lasso, Ridge
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.tree import DecisionTreeRegressor

    assert sklearn
    _, xs, ys = draw("sparse_linear_regression", 3, 12, n_dims=8, sparsity=2)
    xs, ys = xs.double(), ys.double()
    ours = {
        "lasso": baselines.lasso(xs, ys, alpha=0.05, n_iter=20000, tol=1e-13),
        "ridge": baselines.ridge(xs, ys, alpha=0.7),
        "knn": baselines.nearest_neighbours(xs, ys, n_neighbors=3),
        "tree": baselines.decision_tree(xs, ys, max_depth=2),
    }
    for b in range(3):
        for k in (1, 3, 6, 11):
            context, labels, query = xs[b, :k].numpy(), ys[b, :k].numpy(), xs[b, k : k + 1].numpy()
            theirs = {
                "lasso": Lasso(alpha=0.05, fit_intercept=False, tol=1e-13, max_iter=100000),
                "ridge": Ridge(alpha=0.7, fit_intercept=False),
                "knn": KNeighborsRegressor(n_neighbors=min(3, k)),
                "tree": DecisionTreeRegressor(max_depth=2, random_state=0),
            }
            for name, model in theirs.items():
                expected = model.fit(context, labels).predict(query)[0]
                assert ours[name][b, k].item() == pytest.approx(expected, abs=1e-6), (name, b, k)


def test_lasso_beats_least_squares_on_sparse_regression_below_d():
    task, xs, ys = draw("sparse_linear_regression", 300, 9, n_dims=8, sparsity=1)
    lasso = curve(task, baselines.lasso(xs, ys, alpha=0.01), ys)
    least_squares = curve(task, baselines.least_squares(xs, ys), ys)
    assert lasso[4].item() < 0.3 * least_squares[4].item()  # sparse recovery from 4 < d examples


def test_mlp_gd_learns_a_relu_network_from_the_context():
    task, xs, ys = draw("relu_2nn", 64, 16, n_dims=2, hidden_size=4)
    errors = curve(task, baselines.mlp_gd(xs, ys, hidden_size=32, steps=150, lr=0.02), ys)
    assert errors[15].item() < 0.5 * errors[1].item()
    assert errors[15].item() < 0.35


def test_trees_learn_decision_trees_from_the_context():
    pytest.importorskip("sklearn")
    task, xs, ys = draw("decision_tree", 16, 13, n_dims=3, depth=2)
    for name in ("decision_tree", "gradient_boosting:n_estimators=10"):
        errors = curve(task, parse_baseline(name, task)(xs, ys), ys)
        assert errors[12].item() < 0.6 * errors[0].item(), name


@pytest.mark.parametrize(
    "spec",
    ["least_squares", "ridge", "averaging", "knn", "lasso", "mlp_gd:steps=5", "decision_tree"]
    + ["gradient_boosting:n_estimators=3"],
)
def test_prediction_at_k_uses_only_the_k_pairs_before_it(spec):
    if spec.startswith(("decision_tree", "gradient")):
        pytest.importorskip("sklearn")
    task, xs, ys = draw("linear_regression", 4, 7)
    estimator = parse_baseline(spec, task)
    predictions = estimator(xs, ys)
    assert predictions.shape == ys.shape and torch.isfinite(predictions).all()
    assert (predictions[:, 0] == 0).all()  # nothing to learn from
    k = 3
    xs2, ys2 = xs.clone(), ys.clone()
    xs2[:, k + 1 :] += 5.0
    ys2[:, k:] -= 7.0
    torch.testing.assert_close(estimator(xs2, ys2)[:, : k + 1], predictions[:, : k + 1])
    queries = torch.randn(xs.shape, generator=torch.Generator().manual_seed(1))
    moved = estimator(xs, ys, queries)  # another query per k: same fit, prediction at the new query
    assert not torch.allclose(moved[:, 1:], predictions[:, 1:])


def test_bad_specifications_name_the_problem():
    task = get_task("linear_regression", D)
    with pytest.raises(BaselineError, match="unknown baseline 'lasso2'"):
        parse_baseline("lasso2", task)
    with pytest.raises(BaselineError, match="has no option 'beta'"):
        parse_baseline("lasso:beta=1", task)
    with pytest.raises(BaselineError, match="key=value"):
        parse_baseline("knn:5", task)
    spec = parse_baseline("knn:n_neighbors=5:max_prompts=10", task)
    assert spec.kwargs == {"n_neighbors": 5} and spec.max_prompts == 10


def test_without_scikit_learn_tree_baselines_are_skipped_by_default_and_refused_when_asked(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` fail, as when not installed
    task = get_task("decision_tree", D)
    specs, notes = resolve_baselines(None, task)
    assert [s.name for s in specs] == ["least_squares", "averaging", "knn"]
    assert len(notes) == 2 and "pip install 'icl_conml[trees]'" in notes[0]
    with pytest.raises(EvaluationError, match="needs scikit-learn"):
        resolve_baselines(["gradient_boosting"], task)
    _, xs, ys = draw("decision_tree", 2, 4)
    with pytest.raises(BaselineError, match="scikit-learn"):
        baselines.decision_tree(xs, ys)
