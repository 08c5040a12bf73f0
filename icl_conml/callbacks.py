"""Training callbacks: stop on a non-finite loss before it reaches the weights or a checkpoint.

The Trainer's own ``logging_nan_inf_filter`` hides NaN/inf losses from the logs and keeps
training on poisoned weights. ``NonFiniteLossGuard`` checks every optimizer step *before*
``optimizer.step()`` (the ``on_pre_optimizer_step`` event): if the step's loss, one of its
components (icl_loss, conml_loss, d_in, d_out) or the gradient norm is not finite, it raises
``NonFiniteLossError``. Raising there means the bad update is never applied and no checkpoint
of that step is written, so the newest checkpoint on disk is the last good state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from .checkpoints import latest_checkpoint


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN/inf loss or gradient; the message is one line for the user."""


def reduce_max(flag: torch.Tensor) -> torch.Tensor:
    """Max of a tensor over processes (identity without torch.distributed), so all stop together."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag


class NonFiniteLossGuard(TrainerCallback):
    """Raise ``NonFiniteLossError`` at the first optimizer step with a non-finite loss or gradient.

    Args:
        step_losses: returns and clears the loss components recorded since the last optimizer
            step, ``{"loss": [...], "icl_loss": [...], ...}`` with one detached scalar per
            micro-batch (``ConMLTrainer.pop_step_losses``).
    """

    def __init__(self, step_losses: Callable[[], dict[str, list[torch.Tensor]]]) -> None:
        self.step_losses = step_losses

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        means = {
            key: torch.stack(values).float().mean() for key, values in self.step_losses().items() if values
        }
        # Under ZeRO/FSDP gradients may live outside p.grad: then only the losses are checked.
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        grad_norm = torch.nn.utils.get_total_norm(grads).float() if grads else torch.zeros(())
        checked = [value.to(grad_norm.device) for value in means.values()] + [grad_norm]
        bad = (~torch.isfinite(torch.stack(checked))).any().float()
        if float(reduce_max(bad.to(args.device))) == 0:  # NCCL reduces only device tensors
            return control
        raise NonFiniteLossError(_message(args.output_dir, state.global_step + 1, means, float(grad_norm)))


def _message(output_dir: str | None, step: int, means: dict[str, torch.Tensor], grad_norm: float) -> str:
    parts = [f"{key}={float(value):.6g}" for key, value in sorted(means.items())]
    parts.append(f"grad_norm={grad_norm:.6g}")
    if all(math.isfinite(float(value)) for value in means.values()) and math.isfinite(grad_norm):
        parts.append("non-finite on another process")
    last = latest_checkpoint(output_dir) if output_dir else None
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
    return (
        f"non-finite loss at step {step} ({', '.join(parts)}); training stopped before this update, "
        f"nothing from step {step} was saved and {kept}. Lower learning_rate, raise warmup_steps or "
        f"check the task's noise/scale settings, then resume with --resume_from_checkpoint latest"
    )
