"""ConMLTrainer: ``transformers.Trainer`` for in-context meta-training with ConML.

``compute_loss`` adds ``conml_lambda · (d_in − d_out)`` to the ICL loss in the same forward
pass (probe tokens appended to the main sequence, see ``conml.py``). Every loss component is
collected in ``compute_loss`` and averaged (over steps and processes) in ``log``, the pattern
of TRL's trainers, so it reaches every ``report_to`` backend and ``log_history``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils.data import DataLoader, SequentialSampler
from transformers import Trainer

from . import conml
from .callbacks import NonFiniteLossGuard
from .config import ConMLArguments
from .data import PromptSampler, TrainingPrompts
from .hub import ModelCardMixin

#: Batch keys that stay float32 whatever the training precision (see ``_prepare_inputs``).
FLOAT32_INPUTS = ("ys", "probes")


def _single(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate for a dataset whose items are already micro-batches."""
    return items[0]


class ConMLTrainer(ModelCardMixin, Trainer):
    """Trainer whose loss is ICL loss + λ · ConML loss.

    Args:
        conml_args: the ConML settings (``ConMLArguments``); ``None`` or λ = 0 is plain ICL.
        train_dataset: a ``PromptSampler`` (prompts generated from (seed, step)) or any
            dataset of ``{"xs", "ys"}`` items.
    """

    # Our MSE is a mean over the micro-batch: let the Trainer divide it for accumulation.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, conml_args: ConMLArguments | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conml_args = conml_args if conml_args is not None else ConMLArguments(conml_lambda=0.0)
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        # This optimizer step's losses, per micro-batch: checked for NaN/inf before the update.
        self._step_losses: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.add_callback(NonFiniteLossGuard(self.pop_step_losses))

    def pop_step_losses(self) -> dict[str, list[torch.Tensor]]:
        """The loss components recorded since the last optimizer step (and forget them)."""
        losses, self._step_losses = self._step_losses, defaultdict(list)
        return losses

    def _prepare_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move the batch to the device; the regression targets and probes keep their dtype.

        Under DeepSpeed the Trainer casts every float input to the engine's dtype (bf16): the
        targets ``ys`` would lose precision in the loss (8 mantissa bits) and so would the probes.
        They stay float32 here; ``xs`` follows the model's dtype as before (the read-in casts it).
        """
        kept = {key: inputs[key] for key in FLOAT32_INPUTS if isinstance(inputs.get(key), torch.Tensor)}
        if not kept:
            return super()._prepare_inputs(inputs)
        prepared = super()._prepare_inputs({key: value for key, value in inputs.items() if key not in kept})
        prepared.update({key: value.to(self.args.device) for key, value in kept.items()})
        return prepared

    # ---- data ----------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        if not isinstance(self.train_dataset, PromptSampler):
            return super().get_train_dataloader()
        prompts = TrainingPrompts(
            self.train_dataset,
            max_steps=self.args.max_steps,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            process_index=self.args.process_index,
            num_processes=self.args.world_size,
        )
        # Each process generates its own slice: no accelerate sharding or dispatching. The
        # sampler is index-based, so resuming skips seen batches without generating them.
        return DataLoader(prompts, batch_size=1, sampler=SequentialSampler(prompts), collate_fn=_single)

    # ---- loss ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        xs, ys = inputs["xs"], inputs["ys"]
        settings = self.conml_args
        if not (settings.enabled and model.training and "probes" in inputs):
            outputs = model(xs=xs, ys=ys)
            if model.training:
                self._record(outputs.loss, icl_loss=outputs.loss)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        layout = conml.build_layout(
            xs, ys, inputs["probes"], inputs["view_index"], settings.conml_views, settings.conml_prefix_mode
        )
        outputs = model(xs=xs, ys=ys, **layout.model_inputs())
        anchor, views = conml.representations(
            outputs.appended_outputs, outputs.appended_hidden, layout, settings.conml_representation
        )
        all_anchors, offset = conml.gather_across_processes(anchor)
        task_ids = inputs.get("task_ids")  # task-pool batches: rows of one task are not negatives
        all_task_ids = None if task_ids is None else conml.gather_task_ids(task_ids)
        terms = conml.conml_loss(
            anchor,
            views,
            all_anchors,
            offset,
            distance_kind=settings.conml_distance,
            loss_kind=settings.conml_loss,
            terms=settings.conml_terms,
            temperature=settings.conml_temperature,
            task_ids=task_ids,
            all_task_ids=all_task_ids,
        )
        loss = outputs.loss + settings.conml_lambda * terms.loss
        self._record(loss, icl_loss=outputs.loss, conml_loss=terms.loss, d_in=terms.d_in, d_out=terms.d_out)
        return (loss, outputs) if return_outputs else loss

    def _record(self, loss: torch.Tensor, **components: torch.Tensor) -> None:
        """Keep the components for logging, and this step's losses for the non-finite guard."""
        self._step_losses["loss"].append(loss.detach())
        for key, value in components.items():
            self._metrics[key].append(value.detach())
            self._step_losses[key].append(value.detach())

    # ---- logging -------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:  # a training log: flush the components
            keys = sorted(self._metrics)
            local = torch.stack([torch.stack(self._metrics[key]).float().mean() for key in keys])
            averaged = self.accelerator.reduce(local.to(self.args.device), reduction="mean")
            logs.update({key: round(float(value), 6) for key, value in zip(keys, averaged, strict=True)})
            self._metrics.clear()
        super().log(logs, start_time)
