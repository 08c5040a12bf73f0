"""GPT-2's activation (``gelu_new``) with the same floats and less memory traffic: ``ExactNewGELU``.

The activation is elementwise work over the MLP's widest tensor: in the quickstart model's
forward it took as long as the linear layers' matrix multiplies (cProfile). The fused
``gelu(approximate="tanh")`` kernel would be faster still, but rounds differently (about 5e-7),
and training results must not change; ``ExactNewGELU`` keeps them bit-identical
(``tests/test_model.py``). ``ICLModel`` swaps it in with ``use_exact_new_gelu``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_GELU_SCALE = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(√(2/π)·(x + 0.044715·x³)), each step rounded exactly as ``NewGELUActivation`` rounds it
    (in-place steps compute the same floats as the out-of-place ones, without a new tensor each)."""
    return torch.pow(x, 3.0).mul_(0.044715).add_(x).mul_(_GELU_SCALE).tanh_()


class _NewGELUFunction(torch.autograd.Function):
    """``NewGELUActivation`` with the backward autograd would derive from its eight operations,
    written out: the same kernels on the same values, and the input's three gradient paths summed
    in the order autograd's engine sums them, ((via x + …) + (via x³)) + (via 0.5·x), so outputs
    and gradients are bit-identical (``tests/test_model.py``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        t = _gelu_tanh(x)
        half_x, one_plus_t = torch.mul(x, 0.5), torch.add(t, 1.0)
        ctx.save_for_backward(x, t, half_x, one_plus_t)  # what autograd saves for the composite too
        return torch.mul(half_x, one_plus_t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, t, half_x, one_plus_t = ctx.saved_tensors
        via_sum = torch.ops.aten.tanh_backward(torch.mul(grad, half_x), t).mul_(_GELU_SCALE)
        via_cube = torch.mul(via_sum, 0.044715).mul_(torch.pow(x, 2.0).mul_(3.0))
        via_half = torch.mul(grad, one_plus_t).mul_(0.5)
        return via_sum.add_(via_cube).add_(via_half)


class ExactNewGELU(nn.Module):
    """GPT-2's ``gelu_new``, bit-identical to ``transformers``' ``NewGELUActivation`` (forward and
    backward) with fewer tensors of the activation's size: 4 instead of 8 in training, 2 in
    inference (see the module docstring for why).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _NewGELUFunction.apply(x)
        return torch.mul(x, 0.5).mul_(_gelu_tanh(x).add_(1.0))  # inference: two tensors, not eight


def use_exact_new_gelu(module: nn.Module) -> int:
    """Replace every ``NewGELUActivation`` under ``module`` by ``ExactNewGELU``; returns how many."""
    from transformers.activations import NewGELUActivation

    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, ExactNewGELU())
                replaced += 1
    return replaced
