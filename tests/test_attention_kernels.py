"""Attention kernels and ConML's 4D masks: a kernel never silently drops the mask.

Appended tokens (ConML probes, views) need an arbitrary 4D additive mask. Under every attention
kernel transformers knows (on the default GPT-2 and on a Llama backbone), a forward with a probe
either equals running the probe's view as its own sequence, or raises a one-line error naming
the fix; kernels this machine cannot build (flash kernels without a GPU) are set on a built
model, so the check before the backbone is exercised too. Recipes are refused up front.
"""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from icl_conml import ICLConfig, ICLModel
from icl_conml.arguments import RecipeError
from icl_conml.modeling import MASK_KERNELS
from icl_conml.recipe_checks import validate
from icl_conml.recipe_parser import parse_recipe

# Every registered kernel, plus the paged forms transformers resolves by prefix.
KERNELS = sorted({"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys(), "paged|sdpa", "paged|flash_attention_2"})
N_DIMS, N_POINTS, BATCH = 3, 8, 4


def _build(backbone: str, kernel: str, llama_path) -> ICLModel:
    torch.manual_seed(0)
    if backbone == "llama":
        return ICLModel.from_pretrained_backbone(
            str(llama_path), attn_implementation=kernel, n_dims=N_DIMS, n_positions=N_POINTS
        )
    config = ICLConfig(n_dims=N_DIMS, n_positions=N_POINTS, n_embd=32, n_layer=2, n_head=2)
    config.backbone_config._attn_implementation = kernel
    return ICLModel(config)


def _model(backbone: str, kernel: str, llama_path) -> ICLModel:
    """The model under ``kernel``; a kernel that cannot be built here is set on an eager model."""
    try:
        model = _build(backbone, kernel, llama_path)
    except (ImportError, ValueError):  # flash without its package / GPU; flex on GPT-2
        model = _build(backbone, "eager", llama_path)
        model.backbone.config._attn_implementation = kernel
    return model.eval()


def _probe_inputs() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Prompts and one probe after the first half, at the position it would have there."""
    generator = torch.Generator().manual_seed(1)
    xs = torch.randn(BATCH, N_POINTS, N_DIMS, generator=generator)
    ys = torch.randn(BATCH, N_POINTS, generator=generator)
    half, context = N_POINTS // 2, 2 * N_POINTS
    visible = torch.zeros(1, context + 1, dtype=torch.bool)
    visible[0, : 2 * half] = True
    visible[0, context] = True
    probe = torch.randn(1, 1, N_DIMS, generator=generator).expand(BATCH, 1, N_DIMS)
    return xs, ys, {"appended_tokens": probe, "appended_position_ids": torch.tensor([2 * half]),
                    "appended_visible": visible}  # fmt: skip


@pytest.mark.parametrize("backbone", ["gpt2", "llama"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_a_kernel_applies_the_probe_mask_or_refuses(backbone, kernel, llama_path):
    model = _model(backbone, kernel, llama_path)
    xs, ys, probe = _probe_inputs()
    resolved = model.backbone.config._attn_implementation  # paged|sdpa resolves to sdpa
    with torch.no_grad():
        if resolved not in MASK_KERNELS:
            with pytest.raises(
                ValueError, match=r"cannot apply the 4D attention mask.*use attn_implementation='sdpa'"
            ):
                model(xs=xs, ys=ys, **probe)
            return
        full = model(xs=xs, ys=ys, **probe)
        alone = model(
            xs=torch.cat([xs[:, : N_POINTS // 2], probe["appended_tokens"]], dim=1),
            ys=torch.cat([ys[:, : N_POINTS // 2], torch.zeros(BATCH, 1)], dim=1),
        )
        plain = model(xs=xs, ys=ys)
    torch.testing.assert_close(full.appended_outputs[:, 0], alone.predictions[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(full.predictions, plain.predictions, atol=1e-6, rtol=0)


def test_the_mask_kernels_are_the_ones_checked_above():
    assert set(MASK_KERNELS) <= set(KERNELS)
    assert {"flash_attention_2", "flash_attention_3", "flex_attention", "paged|eager"} <= set(KERNELS)


# ---- recipes -------------------------------------------------------------------------------------
def test_conml_with_a_flash_kernel_is_a_recipe_error():
    for kernel in ("flash_attention_2", "flash_attention_3"):
        recipe = parse_recipe(["--attn_implementation", kernel, "--conml_lambda", "0.02"])
        with pytest.raises(
            RecipeError, match=rf"attn_implementation={kernel} takes no attention mask.*use attn"
        ):
            validate(recipe)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without flash-attn")
def test_plain_icl_with_a_flash_kernel_needs_the_package_and_bf16():
    recipe = parse_recipe(["--attn_implementation", "flash_attention_2", "--conml_lambda", "0"])
    with pytest.raises(
        RecipeError, match="needs a CUDA GPU and the flash-attn package.*use attn_implementation=sdpa"
    ):
        validate(recipe)
    with pytest.raises(RecipeError, match="choose one of: eager, sdpa, flash_attention_2, flash_attention_3"):
        parse_recipe(["--attn_implementation", "flex_attention"])
