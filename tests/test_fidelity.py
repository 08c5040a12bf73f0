"""Faithful to Garg et al. (issue 11): tasks under a curriculum, no gradient clipping in the Garg
recipes, task pools without repeats within a batch; and data without a curriculum unchanged."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN_ARGS

from icl_conml.data import (
    ConMLSampling,
    Curriculum,
    Prompts,
    PromptSampler,
    Schedule,
    distinct_indices,
)
from icl_conml.recipe_parser import parse_recipe
from icl_conml.tasks import get_task
from icl_conml.train import build_sampler, main

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
GARG_RECIPES = ("linear_regression", "sparse_linear_regression", "decision_tree", "relu_2nn")


def recipe(name: str, tmp_path: Path):
    return parse_recipe([str(RECIPES / f"{name}.yaml"), "--output_dir", str(tmp_path)])


# ---- 1. tasks are drawn among the curriculum's active coordinates ---------------------------------
def test_sparse_recipe_step_0_has_three_active_weights_and_no_zero_prompt(tmp_path):
    # The measurement: at step 0 (5 of 20 dimensions active, 11 points) a support drawn
    # from all 20 coordinates left 0.77 active non-zero weights per task and 39% of prompts y ≡ 0.
    sampler = build_sampler(recipe("sparse_linear_regression", tmp_path))
    assert sampler.curriculum.dims.at(0) == 5 and sampler.global_batch_size == 64
    for step in range(3):
        batch = sampler.global_batch(step)
        assert not (batch["ys"] == 0).all(dim=1).any()
        # recover each prompt's w on the 5 active coordinates from its 11 noiseless points
        w = torch.linalg.lstsq(batch["xs"][:, :, :5], batch["ys"].unsqueeze(-1)).solution.squeeze(-1)
        assert ((w.abs() > 1e-4).sum(dim=1) == 3).all()


def test_sparse_support_lies_in_the_active_coordinates():
    task = get_task("sparse_linear_regression", 10, sparsity=3)
    for active, nonzeros in [(5, 3), (3, 3), (2, 2), (10, 3)]:  # sparsity > active: all active ones
        w = task.sample_params(500, torch.Generator().manual_seed(0), active_dims=active)["w"]
        assert ((w[:, :active] != 0).sum(dim=1) == nonzeros).all() and (w[:, active:] == 0).all()
    # every active coordinate is in the support equally often
    w = task.sample_params(6000, torch.Generator().manual_seed(1), active_dims=5)["w"]
    assert (w != 0).float().mean(0)[:5].tolist() == pytest.approx([3 / 5] * 5, abs=0.03)
    with pytest.raises(ValueError, match="active_dims"):
        task.sample_params(2, torch.Generator(), active_dims=11)


def test_decision_tree_splits_on_active_coordinates_only():
    # Garg's code draws split features from all n_dims (a documented difference, see DecisionTree)
    task = get_task("decision_tree", 20, depth=4)
    features = task.sample_params(500, torch.Generator().manual_seed(0), active_dims=5)["features"]
    assert features.max() == 4 and features.min() == 0
    curriculum = Curriculum(Schedule(5, 20, 1, 2000), Schedule(26, 26, 0, 0))
    ys = PromptSampler(task, curriculum, global_batch_size=64, seed=0).global_batch(0)["ys"]
    assert (ys.max(dim=1).values > ys.min(dim=1).values).all()  # no constant prompt


@pytest.mark.parametrize(
    "name", ["linear_regression", "noisy_linear_regression", "linear_classification", "quadratic_regression"]
)
def test_dense_classes_draw_the_same_functions_whatever_the_active_dims(name):
    # the weights of inactive coordinates multiply x = 0: drawing them changes nothing on the data
    task = get_task(name, 8)
    full = task.sample_params(16, torch.Generator().manual_seed(0))
    early = task.sample_params(16, torch.Generator().manual_seed(0), active_dims=3)
    assert all(torch.equal(full[key], early[key]) for key in full)


def test_relu_2nn_weights_on_inactive_coordinates_do_not_change_y():
    task = get_task("relu_2nn", 8, hidden_size=16)
    params = task.sample_params(16, torch.Generator().manual_seed(0), active_dims=3)
    xs = task.sample_xs(16, 5, torch.Generator().manual_seed(1))
    xs[:, :, 3:] = 0
    cut = {"w1": params["w1"].clone(), "w2": params["w2"]}
    cut["w1"][:, 3:] = 0
    assert torch.equal(task.evaluate(params, xs), task.evaluate(cut, xs))


# ---- data without a curriculum is unchanged ---------------------------------------------------------
def _digest(batch: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(batch):
        value = batch[key]
        if value.is_floating_point():
            value = value.round(decimals=3)
        h.update(key.encode())
        h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# Recorded with the code before issue 11 (commit bba6463) by the same digest: n_dims 6, 9 points,
# batch 8, seed 3, steps 0-5; "curric" grows 2 -> 6 dims (unchanged for the dense classes only).
BEFORE = {
    "decision_tree": ("4f7d16551d74efba", "6bb81fe82a94199f", "9bcb8626b098ef69", None),
    "linear_classification": ("3de32f55b8b77a90", "6337305e4416e3b1", "fa07fc69c27a51de", "f7415d38575682e0"),
    "linear_regression": ("b9c10bad0995ef6e", "ce6cb18093920175", "06e8cab7c93fbe4b", "ba8a6f07e5f77283"),
    "noisy_linear_regression": (
        "165c688d489a7cda",
        "35c7673592b6a364",
        "fa226a218ee37545",
        "518bfac0a3374c00",
    ),
    "quadratic_regression": ("e01e6118ff29f93c", "e001268280699141", "f5f1aa575acd8831", "6004d56ee788ef23"),
    "relu_2nn": ("63b2bb1d608b719c", "9b555b018cc4b233", "2f6f50d126e0e08d", "d5508335024c34f6"),
    "sparse_linear_regression": ("97faad44697777c4", "2bda7e1015a5ee9b", "397ae2a56c5e2591", None),
}


@pytest.mark.parametrize("name", sorted(BEFORE))  # every built-in class of the time
def test_data_without_curriculum_or_pool_is_bit_identical_to_before(name):
    task = get_task(name, 6, sparsity=2, hidden_size=7, depth=3, noise_std=1.0)  # as when recorded
    sampling = ConMLSampling(num_probes=1, views="random_subset", num_views=2, subset_min=0.3, subset_max=0.7)
    growing = Curriculum(Schedule(2, 6, 1, 2), Schedule(5, 9, 1, 2))

    def run(curriculum: Curriculum, conml: ConMLSampling | None) -> str:
        sampler = PromptSampler(task, curriculum, 8, seed=3, conml_sampling=conml)
        joined = "".join(_digest(sampler.global_batch(step)) for step in range(6))
        return hashlib.sha256(joined.encode()).hexdigest()[:16]

    plain, with_conml, fixed, curriculum = BEFORE[name]
    assert run(Curriculum.constant(6, 9), None) == plain
    assert run(Curriculum.constant(6, 9), sampling) == with_conml
    prompts = Prompts.sample(task, 8, 9, seed=3)
    assert _digest({"xs": prompts.xs, "ys": prompts.ys}) == fixed
    if curriculum is not None:
        assert run(growing, None) == curriculum


def test_sparse_draws_are_the_old_ones_at_full_dimension():
    # the code before issue 11, verbatim: the same generator calls give the same w
    task = get_task("sparse_linear_regression", 7, sparsity=3)
    g_old, g_new = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    w = torch.randn(50, 7, generator=g_old)
    ranks = torch.rand(50, 7, generator=g_old).argsort(dim=1).argsort(dim=1)
    assert torch.equal(task.sample_params(50, g_new, active_dims=7)["w"], w * (ranks < 3))
    assert torch.equal(torch.rand(3, generator=g_old), torch.rand(3, generator=g_new))


# ---- 2. the Garg recipes do not clip gradients; the quickstart does ---------------------------------
@pytest.mark.parametrize("name", GARG_RECIPES)
def test_garg_recipes_train_without_gradient_clipping(name, tmp_path):
    loaded = recipe(name, tmp_path)
    assert loaded.training.max_grad_norm == 0  # the Trainer clips only if max_grad_norm > 0
    assert loaded.training.optim.startswith("adamw") and loaded.training.weight_decay == 0  # = Adam


def test_quickstart_clips_gradients(tmp_path):
    assert recipe("quickstart", tmp_path).training.max_grad_norm == 1.0


# ---- 3. finite task pools: no task twice in a batch the pool can fill ---------------------------------
@pytest.mark.parametrize("pool_size", [8, 13, 1000])  # = batch, > batch (permutation), >> batch (redraws)
def test_pool_at_least_the_batch_gives_distinct_tasks(pool_size):
    task = get_task("linear_regression", 3)
    sampler = PromptSampler(task, Curriculum.constant(3, 5), 8, seed=0, task_pool_size=pool_size)
    for step in range(20):
        batch = sampler.global_batch(step)
        ids = batch["task_ids"]
        assert ids.dtype == torch.long and ids.unique().numel() == 8
        assert 0 <= ids.min() and ids.max() < pool_size
        w = torch.linalg.lstsq(batch["xs"], batch["ys"].unsqueeze(-1)).solution.squeeze(-1)
        torch.testing.assert_close(w, sampler.pool(3)["w"][ids], atol=1e-4, rtol=0)


def test_distinct_indices_are_distinct_and_uniform_on_the_redraw_path():
    whole = distinct_indices(10, 10, torch.Generator().manual_seed(0))  # a permutation
    assert whole.sort().values.tolist() == list(range(10))
    counts = torch.zeros(1000)  # 1000 > 64 × 10: draws with replacement, then redraws repeats
    for seed in range(2000):
        index = distinct_indices(1000, 10, torch.Generator().manual_seed(seed))
        assert index.unique().numel() == 10 and 0 <= index.min() and index.max() < 1000
        counts[index] += 1
    assert counts.mean() == 20 and counts.std() < 6  # Poisson(20) has std 4.5


def test_pool_smaller_than_the_batch_repeats_tasks_with_their_ids():
    task = get_task("linear_regression", 3)
    sampler = PromptSampler(task, Curriculum.constant(3, 5), 8, seed=0, task_pool_size=4)
    batch = sampler.global_batch(0)
    ids = batch["task_ids"]
    assert ids.unique().numel() < 8  # 8 draws from 4 tasks
    w = torch.linalg.lstsq(batch["xs"], batch["ys"].unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(w, sampler.pool(3)["w"][ids], atol=1e-4, rtol=0)
    halves = [sampler.micro_batch(0, part, 2)["task_ids"] for part in range(2)]
    assert torch.equal(torch.cat(halves), ids)
    fresh = PromptSampler(task, Curriculum.constant(3, 5), 8, seed=0).global_batch(0)
    assert "task_ids" not in fresh  # fresh tasks are all distinct


def test_pool_under_a_curriculum_keeps_its_tasks_and_their_supports_in_the_active_coordinates():
    task = get_task("sparse_linear_regression", 8, sparsity=3)
    curriculum = Curriculum(Schedule(4, 8, 2, 10), Schedule(6, 6, 0, 0))
    sampler = PromptSampler(task, curriculum, 8, seed=0, task_pool_size=32)
    early, late = sampler.pool(4)["w"], sampler.pool(8)["w"]
    assert ((early != 0).sum(1) == 3).all() and (early[:, 4:] == 0).all()
    assert ((late != 0).sum(1) == 3).all()
    # the same tasks: where a weight is kept at both stages it is the same weight
    both = (early != 0) & (late != 0)
    assert both.any() and torch.equal(early[both], late[both])
    ys = sampler.global_batch(0)["ys"]
    assert not (ys == 0).all(dim=1).any()


def test_trainer_passes_task_ids_so_a_single_task_pool_has_no_d_out(tmp_path):
    # a pool of 1: all 16 rows are one task, so there is no pair of distinct tasks to push apart
    out = tmp_path / "run"
    extra = ["--max_steps", "2", "--conml_lambda", "0.02", "--task_pool_size", "1", "--output_dir", str(out)]
    assert main([*TINY_TRAIN_ARGS, *extra]) == 0
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "d_out" in e]
    assert len(logs) == 2 and all(e["d_out"] == 0 and e["conml_loss"] == e["d_in"] > 0 for e in logs)
