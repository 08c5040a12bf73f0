"""Sizes that cannot fit: estimated up front, refused in one line with the estimate.

A typo such as ``n_dims: 100000000`` (a read-in layer of 25.6 GB) or ``--n_prompts 1000000000``
used to start allocating and end minutes later in a MemoryError (or the out-of-memory killer).
These estimates count the large tensors only (model state, prompts, task parameters,
activations), so they are lower bounds: a refused run could never have fitted.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .arguments import Recipe
    from .tasks import FunctionClass

FLOAT = 4  # bytes: weights, prompts and activations are float32


def machine_memory() -> int:
    """Bytes of physical memory, plus every accelerator's (0 if unknown)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
    try:
        import torch

        if torch.cuda.is_available():
            total += sum(
                torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())
            )
    except Exception:  # noqa: BLE001 - only an estimate
        pass
    return total


def _gb(size: float) -> str:
    return f"{size / 1e9:,.1f} GB" if size >= 1e8 else f"{size / 1e6:,.1f} MB"


def task_parameters(task: FunctionClass) -> int:
    """Numbers one function of the class holds: the sizes of its parameters drawn on the meta
    device (shapes only, nothing allocated); ``n_dims`` when the class cannot draw them there."""
    import torch

    try:
        with torch.device("meta"):
            params = task.sample_params(1, torch.Generator().manual_seed(0))
        return max(sum(value.numel() for value in params.values()), task.n_dims)
    except Exception:  # noqa: BLE001 - a class that cannot be sized on the meta device: one weight vector
        return task.n_dims


def training_memory(recipe: Recipe) -> list[tuple[str, float]]:
    """The large allocations of a training run: (what, bytes), largest first."""
    task, model, training = recipe.task, recipe.model, recipe.training
    d, n, e, layers = task.n_dims, task.n_points, model.n_embd, model.n_layer
    positions = recipe.n_positions
    read_in = d * e + e
    backbone = 0 if model.backbone_name_or_path else (2 * positions + 1) * e + layers * (12 * e * e + 13 * e)
    params = read_in + backbone + e + 1
    per_device = training.per_device_train_batch_size
    global_batch = recipe.global_batch_size
    per_task = task_parameters(recipe.function_class)
    tokens = 2 * n + 2
    items = [
        (
            f"model state ({params:,} parameters x 4 copies: weights, gradients, Adam moments; "
            f"read-in n_dims={d} x n_embd={e})",
            16.0 * params,
        ),
        (
            f"training prompts (global batch {global_batch} x n_points={n} x n_dims={d}, with their functions)",
            FLOAT * global_batch * (n * (d + 1) + per_task),
        ),
        (
            f"activations (batch {per_device} x {tokens} tokens x n_embd={e} x n_layer={layers}, attention)",
            FLOAT * per_device * layers * (16 * tokens * e + 2 * model.n_head * tokens * tokens),
        ),
    ]
    if task.eval_n_prompts:
        items.append((f"eval prompts (eval_n_prompts={task.eval_n_prompts} x n_points={n} x n_dims={d})",
                      FLOAT * task.eval_n_prompts * (n * (d + 1) + per_task)))  # fmt: skip
    if task.task_pool_size:
        items.append((f"task pool (task_pool_size={task.task_pool_size} functions of {per_task:,} numbers)",
                      FLOAT * task.task_pool_size * per_task))  # fmt: skip
    return sorted(items, key=lambda item: -item[1])


def evaluation_memory(n_prompts: int, n_points: int, n_dims: int, per_task: int) -> list[tuple[str, float]]:
    """The large allocations of an evaluation: prompts (with functions), predictions and errors per estimator."""
    return [
        (
            f"prompts (n_prompts={n_prompts} x n_points={n_points} x n_dims={n_dims}, with their functions)",
            FLOAT * n_prompts * (n_points * (n_dims + 1) + per_task),
        ),
        (
            f"predictions and errors (n_prompts={n_prompts} x n_points={n_points}, per estimator)",
            FLOAT * 4 * n_prompts * n_points,
        ),  # fmt: skip
    ]


def too_large(items: list[tuple[str, float]], available: int | None = None) -> str | None:
    """A one-line reason when the estimate exceeds the machine's memory, else ``None``."""
    available = machine_memory() if available is None else available
    total = sum(size for _, size in items)
    if not available or total <= available:
        return None
    biggest = "; ".join(f"{what}: {_gb(size)}" for what, size in items[:2] if size >= 0.1 * total)
    return f"needs at least {_gb(total)} of memory ({biggest}) but this machine has {_gb(available)}"
