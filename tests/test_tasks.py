"""Function classes: shapes, Garg et al.'s scalings, sparsity, determinism, task pools."""

import pytest
import torch

from icl_conml.data import Curriculum, PromptSampler, Schedule
from icl_conml.tasks import TASKS, get_task

N_TASKS, N_POINTS, D = 2000, 8, 10


def sample(name: str, **kwargs):
    task = get_task(name, D, **kwargs)
    gen = torch.Generator().manual_seed(0)
    params = task.sample_params(N_TASKS, gen)
    xs = task.sample_xs(N_TASKS, N_POINTS, gen)
    return task, params, xs, task.evaluate(params, xs, gen)


@pytest.mark.parametrize("name", sorted(TASKS.names()))
def test_shapes_and_determinism(name):
    task, params, xs, ys = sample(name)
    assert xs.shape == (N_TASKS, N_POINTS, D) and ys.shape == (N_TASKS, N_POINTS)
    assert torch.isfinite(ys).all()
    _, _, xs2, ys2 = sample(name)
    assert torch.equal(xs, xs2) and torch.equal(ys, ys2)
    assert task.error_normaliser > 0


@pytest.mark.parametrize(
    "name, expected",
    [("linear_regression", D), ("quadratic_regression", D), ("relu_2nn", D), ("decision_tree", 1.0)],
)
def test_second_moment_matches_garg(name, expected):
    _, _, _, ys = sample(name)
    assert ys.square().mean().item() == pytest.approx(expected, rel=0.1)


def test_noisy_linear_regression_adds_noise_of_the_given_std():
    task, params, xs, ys = sample("noisy_linear_regression", noise_std=0.5)
    clean = torch.einsum("bnd,bd->bn", xs, params["w"])
    assert (ys - clean).std().item() == pytest.approx(0.5, rel=0.05)
    assert task.error_normaliser == D


def test_sparse_linear_regression_has_exactly_sparsity_nonzeros():
    task, params, _, ys = sample("sparse_linear_regression", sparsity=3)
    assert ((params["w"] != 0).sum(dim=1) == 3).all()
    assert task.error_normaliser == 3
    assert ys.square().mean().item() == pytest.approx(3, rel=0.1)
    with pytest.raises(ValueError, match="sparsity"):
        get_task("sparse_linear_regression", 2, sparsity=3)


def test_linear_classification_labels_and_error():
    task, _, _, ys = sample("linear_classification")
    assert set(ys.unique().tolist()) == {-1.0, 1.0}
    assert task.error(ys, ys).sum() == 0 and task.error(-ys, ys).mean() == 1


def test_decision_tree_follows_its_splits():
    task = get_task("decision_tree", 3, depth=1)
    params = {"features": torch.tensor([[2]]), "leaves": torch.tensor([[-1.0, 5.0]])}
    xs = torch.tensor([[[0.0, 0.0, -1.0], [9.0, 9.0, 0.5]]])
    assert task.evaluate(params, xs).tolist() == [[-1.0, 5.0]]


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="linear_regression"):
        get_task("linear_regresion", 5)


def test_batch_is_a_function_of_seed_and_step_and_slices_are_the_global_batch():
    task = get_task("linear_regression", 5)
    sampler = PromptSampler(task, Curriculum.constant(5, 11), global_batch_size=8, seed=3)
    again = PromptSampler(task, Curriculum.constant(5, 11), global_batch_size=8, seed=3)
    assert torch.equal(sampler.global_batch(7)["xs"], again.global_batch(7)["xs"])
    assert not torch.equal(sampler.global_batch(7)["xs"], sampler.global_batch(8)["xs"])
    halves = [sampler.micro_batch(7, part, 2)["ys"] for part in range(2)]
    assert torch.equal(torch.cat(halves), sampler.global_batch(7)["ys"])


def test_curriculum_zeroes_dimensions_and_grows_points():
    task = get_task("linear_regression", 8)
    curriculum = Curriculum(Schedule(2, 8, 1, 10), Schedule(3, 9, 2, 10))
    sampler = PromptSampler(task, curriculum, global_batch_size=4, seed=0)
    early, late = sampler.global_batch(0), sampler.global_batch(25)
    assert early["xs"].shape == (4, 3, 8) and late["xs"].shape == (4, 7, 8)
    assert (early["xs"][:, :, 2:] == 0).all() and (early["xs"][:, :, :2] != 0).all()
    assert (late["xs"][:, :, 4:] == 0).all() and (late["xs"][:, :, :4] != 0).all()
    assert curriculum.dims.at(10**6) == 8


def test_task_pool_draws_from_a_fixed_set_of_functions():
    task = get_task("linear_regression", 4)
    sampler = PromptSampler(task, Curriculum.constant(4, 6), global_batch_size=64, seed=0, task_pool_size=3)
    ws = set()
    for step in range(5):
        batch = sampler.global_batch(step)
        # recover each prompt's w from its 6 >= 4 noiseless points
        w = torch.linalg.lstsq(batch["xs"], batch["ys"].unsqueeze(-1)).solution.squeeze(-1)
        ws.update(tuple(round(v, 3) for v in row.tolist()) for row in w)
    assert len(ws) == 3


def test_a_scaled_shift_leaves_the_error_of_sign_labels_as_is():
    """Whether labels are signs is a property of the class (``sign_labels``), not of its name."""
    from dataclasses import dataclass

    from icl_conml.data import ood_error_scale
    from icl_conml.tasks import LinearClassification

    @dataclass
    class Renamed(LinearClassification):  # a user's subclass, never registered
        pass

    assert ood_error_scale(get_task("linear_regression", 3), "scale_x=3") == 9.0
    assert ood_error_scale(get_task("linear_classification", 3), "scale_x=3") == 1.0
    assert ood_error_scale(Renamed(3), "scale_y=0.5") == 1.0


def test_the_abstract_base_named_as_a_task_is_one_line(tmp_path):
    """``task: icl_conml.tasks:FunctionClass`` (the base, whose methods raise NotImplementedError)
    is refused when the recipe is read, in one line, not with a traceback from the first step."""
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "icl_conml.train", "--task", "icl_conml.tasks:FunctionClass",
         "--max_steps", "1", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "icl_conml: error: task='icl_conml.tasks:FunctionClass': task 'icl_conml.tasks:FunctionClass': "
        "icl_conml.tasks.FunctionClass is not a FunctionClass subclass that implements sample_params and evaluate"
    ]
    assert not (tmp_path / "out").exists()
