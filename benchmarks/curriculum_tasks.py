"""Tasks at the start of a Garg curriculum (issue 11): are they the tasks the recipe promises?

At step 0 of ``recipes/sparse_linear_regression.yaml`` (5 of 20 dimensions active, 11 points)
it reports the non-zero weights per task on the active coordinates and the share of prompts
with y ≡ 0; at step 0 of ``recipes/decision_tree.yaml`` (5 of 20 dimensions, 26 points) the
leaves a prompt reaches and the share of prompts with a constant y, for split features drawn
among the active coordinates (this repository) and among all 20 (Garg et al.'s code).

    python benchmarks/curriculum_tasks.py [--steps 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from icl_conml.data import _TRAIN_STREAM, step_generator
from icl_conml.recipe_parser import parse_recipe
from icl_conml.train import build_sampler

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def sampler_of(name: str):
    with tempfile.TemporaryDirectory() as out:
        return build_sampler(parse_recipe([str(RECIPES / f"{name}.yaml"), "--output_dir", out]))


def sparse(steps: int) -> None:
    sampler = sampler_of("sparse_linear_regression")
    active = sampler.curriculum.dims.at(0)
    weights, zero, total = [], 0, 0
    for step in range(steps):
        batch = sampler.global_batch(step)
        # each prompt's w on the active coordinates, recovered from its noiseless points
        xs = batch["xs"][:, :, :active]
        w = torch.linalg.lstsq(xs, batch["ys"].unsqueeze(-1)).solution.squeeze(-1)
        weights.append((w.abs() > 1e-4).sum(dim=1).float())
        zero += int((batch["ys"] == 0).all(dim=1).sum())
        total += batch["ys"].shape[0]
    counts = torch.cat(weights)
    print(
        f"sparse_linear_regression, step 0 ({active} of {sampler.task.n_dims} dims, {total} prompts): "
        f"active non-zero weights per task mean {counts.mean():.3f} (min {counts.min():.0f}, "
        f"max {counts.max():.0f}); prompts with y ≡ 0: {zero / total:.1%}"
    )


def tree(steps: int) -> None:
    sampler = sampler_of("decision_tree")
    task, active = sampler.task, sampler.curriculum.dims.at(0)
    n_points, size = sampler.curriculum.points.at(0), sampler.global_batch_size
    for label, dims in [(f"active {active}", active), (f"all {task.n_dims} (Garg's code)", None)]:
        leaves, constant, total = 0.0, 0, 0
        for step in range(steps):
            generator = step_generator(sampler.seed, step, _TRAIN_STREAM)
            params = task.sample_params(size, generator, active_dims=dims)  # as global_batch draws
            xs = task.sample_xs(size, n_points, generator)
            xs[:, :, active:] = 0
            distinct = torch.tensor([row.unique().numel() for row in task.evaluate(params, xs)])
            leaves += distinct.sum().item()
            constant += int((distinct == 1).sum())
            total += size
        print(
            f"decision_tree, step 0, split features from {label}: leaves reached per {n_points}-point "
            f"prompt {leaves / total:.2f} of {2**task.depth}; prompts with constant y: {constant / total:.1%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=20, help="batches (of the recipe's 64 prompts) per figure"
    )
    args = parser.parse_args()
    sparse(args.steps)
    tree(args.steps)


if __name__ == "__main__":
    main()
