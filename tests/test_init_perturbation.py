"""The A/A control's perturbation of the initial weights (``init_perturbation_std``)."""

from __future__ import annotations

import pytest
import torch

from icl_conml.arguments import RecipeError
from icl_conml.recipe_parser import parse_recipe
from icl_conml.train import build_model

TINY = ["--n_embd", "16", "--n_layer", "1", "--n_head", "2", "--output_dir", "unused"]


def weights(*args: str, seed: int = 3) -> dict[str, torch.Tensor]:
    recipe = parse_recipe([*TINY, "--seed", str(seed), *args])
    return {name: p.detach().clone() for name, p in build_model(recipe).named_parameters()}


def test_a_rounding_level_perturbation_moves_every_weight_by_about_std_and_nothing_else():
    reference, again = weights(), weights("--init_perturbation_std", "0")
    assert all(torch.equal(reference[name], again[name]) for name in reference)  # 0 = off, bit-identical

    perturbed = weights("--init_perturbation_std", "1e-7")
    differences = torch.cat([(perturbed[name] - reference[name]).flatten() for name in reference])
    assert (differences != 0).float().mean() > 0.9  # nearly every weight moved (a few round back)
    assert 0.5e-7 < differences.std().item() < 2e-7 and differences.abs().max().item() < 1e-6
    # Its own generator: the same seed gives the same perturbation, another seed another one.
    assert all(torch.equal(perturbed[n], weights("--init_perturbation_std", "1e-7")[n]) for n in reference)
    other_shift = (
        weights("--init_perturbation_std", "1e-7", seed=4)["read_in.weight"]
        - weights(seed=4)["read_in.weight"]
    )
    assert not torch.allclose(
        other_shift, perturbed["read_in.weight"] - reference["read_in.weight"], atol=1e-9
    )


@pytest.mark.parametrize("value", ["-1e-7", "inf", "nan"])
def test_a_negative_or_non_finite_perturbation_is_refused_in_one_line(value):
    with pytest.raises(RecipeError, match="init_perturbation_std=.* must be a finite number >= 0"):
        parse_recipe([f"--init_perturbation_std={value}"])
