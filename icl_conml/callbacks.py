"""Training callbacks: stop on a non-finite loss before it reaches the weights or a checkpoint.

The Trainer's own ``logging_nan_inf_filter`` hides NaN/inf losses from the logs and keeps
training on poisoned weights. ``NonFiniteLossGuard`` checks every optimizer step twice:

- *before* ``optimizer.step()`` (the ``on_pre_optimizer_step`` event): if the step's loss, one
  of its components (icl_loss, conml_loss, d_in, d_out) or the gradient norm is not finite, it
  raises ``NonFiniteLossError``, so the bad update is never applied;
- *after* it (``on_step_end``, which runs before the Trainer logs, evaluates or saves): finite
  gradients can still give a non-finite update (an infinite or enormous learning rate, a NaN
  weight decay or Adam epsilon); if any trainable weight is NaN/inf it raises too.

Raising there means no checkpoint of that step is written, and every checkpoint that was
written held finite weights, so the newest checkpoint on disk is the last good state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from .checkpoints import latest_checkpoint
from .distributed import reduce_max
from .errors import EXIT_NON_FINITE, CommandError


class NonFiniteLossError(CommandError, RuntimeError):
    """Training hit a NaN/inf loss or gradient; the message is one line for the user (exit 3)."""

    exit_code = EXIT_NON_FINITE


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

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # Under ZeRO-3 a parameter's local shard is ds_tensor (p.data is an empty placeholder).
        named = [
            (n, getattr(p, "ds_tensor", p).detach()) for n, p in model.named_parameters() if p.requires_grad
        ]
        tensors = [t for _, t in named if t.numel()]
        bad = torch.zeros(())
        if tensors:
            # A finite sum proves every entry finite (NaN/inf propagate), at a tenth of isfinite's
            # cost on CPU; only a non-finite sum (or an overflow) takes the exact check.
            sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
            if not bool(torch.isfinite(sums).all()):
                bad = (~torch.stack([torch.isfinite(t).all() for t in tensors]).all()).float()
        if float(reduce_max(bad.to(args.device))) == 0:  # one synchronisation per step
            return control
        names = [n for n, _ in named]
        poisoned = [n for n, t in named if t.numel() and not torch.isfinite(t).all()]
        raise NonFiniteLossError(_update_message(args, state.global_step, poisoned, len(names)))


def _update_message(args, step: int, poisoned: list[str], total: int) -> str:
    shown = ", ".join(poisoned[:3]) + (", ..." if len(poisoned) > 3 else "")
    where = (
        f"{len(poisoned)} of {total} weight tensors ({shown})" if poisoned else "weights on another process"
    )
    settings = (
        f"learning_rate={args.learning_rate:g}, weight_decay={args.weight_decay:g}, "
        f"adam_epsilon={args.adam_epsilon:g}"
    )
    last = latest_checkpoint(args.output_dir) if args.output_dir else None
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
    return (
        f"non-finite weights after the update of step {step}: {where} became NaN/inf although the loss and "
        f"gradients were finite ({settings}); nothing from step {step} was saved and {kept}. Lower "
        f"learning_rate (or fix weight_decay/adam_epsilon), then resume with --resume_from_checkpoint latest"
    )


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
