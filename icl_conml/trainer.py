"""ConMLTrainer: ``transformers.Trainer`` for in-context meta-training with ConML.

``compute_loss`` adds ``conml_lambda · (d_in − d_out)`` to the ICL loss in the same forward
pass (probe tokens appended to the main sequence, see ``conml.py``). Every loss component is
collected in ``compute_loss`` and averaged (over steps and processes) in ``log``, the pattern
of TRL's trainers, so it reaches every ``report_to`` backend and ``log_history``.

Saving hooks live in one place (the "saving" section): every folder the Trainer saves (each
checkpoint, the final model, what ``push_to_hub`` uploads) also gets the run's own files,
``write_run_files``: the recipe, the ``ICLConfig`` next to a LoRA adapter and the model card.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pickle
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, SequentialSampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import conml
from .arguments import ConMLArguments, RecipeError
from .callbacks import NonFiniteLossGuard
from .data import PromptSampler, TrainingPrompts
from .hub import push_repo_id
from .lora import record_repo_id
from .model_card import RECIPE_NAME, write_model_card
from .runs.files import write_bytes

logger = logging.getLogger(__name__)

#: Batch keys that stay float32 whatever the training precision (see ``_prepare_inputs``).
FLOAT32_INPUTS = ("ys", "probes")


def _restore_indexed_cpu(storage, location: str):
    """``torch.load`` restorer for an indexed CPU location (``cpu:0``), which torch does not know.

    transformers 5.17 resumes a multi-process CPU run (gloo) with ``torch.load(...,
    map_location=args.device)``, ``cpu:<index>``, and torch then stops with "don't know how to
    restore data location of torch.storage.UntypedStorage (tagged with cpu:0)"; newer releases
    pass ``"cpu"``. The storage is already in CPU memory: keep it. Other locations: not ours.
    """
    return storage if location.startswith("cpu:") else None


torch.serialization.register_package(11, lambda storage: None, _restore_indexed_cpu)


@contextlib.contextmanager
def _unsafe_file_named(checkpoint: str | None, files: str) -> Iterator[None]:
    """A load that ``torch.load(weights_only=True)`` refuses (a pickle payload) as one line naming
    the checkpoint's file (``checkpoints.check_checkpoint`` names it before the resume; this covers
    a file replaced in between)."""
    try:
        yield
    except pickle.UnpicklingError:
        raise RecipeError(
            f"resume_from_checkpoint={checkpoint!r}: {files} holds more than tensors (torch.load with "
            f"weights_only refuses it: a pickle payload or a damaged file) and was not loaded; resume from "
            f"another checkpoint-N, or pass --resume_weights_only true"
        ) from None


def _single(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate for a dataset whose items are already micro-batches."""
    return items[0]


class ConMLTrainer(Trainer):
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
        self._pre_clip_grad_norm = None  # this step's gradient norm before clipping (_get_grad_norm)
        self._step_inputs: list[dict[str, torch.Tensor]] = []  # references only: judged after a failure
        self.add_callback(
            NonFiniteLossGuard(
                self.pop_step_losses, lambda: self._pre_clip_grad_norm, self.step_inputs_finite
            )
        )
        self.add_callback(CheckpointCardOnPush())

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm (before clipping), kept for ``NonFiniteLossGuard``: after
        clipping, an infinite norm leaves gradients of 0 that look finite."""
        self._pre_clip_grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        return self._pre_clip_grad_norm

    # ---- resuming: a file that cannot be loaded safely is named, not a traceback --------------------
    def _load_optimizer_and_scheduler(self, checkpoint):
        with _unsafe_file_named(checkpoint, "optimizer.pt or scheduler.pt"):
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._apply_allowed_changes()

    def _apply_allowed_changes(self) -> None:
        """``resume_allow_changes``: the optimizer and schedule states just loaded carry the old
        run's learning rate, betas, epsilon and weight decay; put the recipe's values in their place
        (else the change would be recorded but never take effect)."""
        allowed = set(getattr(self.args, "resume_allow_changes", None) or ())
        args, groups = self.args, self.optimizer.param_groups
        if "learning_rate" in allowed:
            scheduler = self.lr_scheduler
            if hasattr(scheduler, "base_lrs") and hasattr(scheduler, "lr_lambdas"):
                scheduler.base_lrs = [args.learning_rate] * len(groups)
                for group, schedule in zip(groups, scheduler.lr_lambdas, strict=True):
                    group["initial_lr"] = args.learning_rate
                    group["lr"] = args.learning_rate * schedule(scheduler.last_epoch)
                scheduler._last_lr = [group["lr"] for group in groups]
            else:
                for group in groups:
                    group["lr"] = args.learning_rate
        for key, name in (("adam_epsilon", "eps"), ("weight_decay", "weight_decay")):
            if key in allowed:
                for group in groups:
                    if name in group and (name != "weight_decay" or group[name] != 0):
                        group[name] = getattr(args, key)  # (parameters without decay keep 0)
        for index, key in enumerate(("adam_beta1", "adam_beta2")):
            if key in allowed:
                for group in groups:
                    if "betas" in group:
                        betas = list(group["betas"])
                        betas[index] = getattr(args, key)
                        group["betas"] = tuple(betas)

    def _load_rng_state(self, checkpoint):
        with _unsafe_file_named(checkpoint, "rng_state*.pth"):
            return super()._load_rng_state(checkpoint)

    def pop_step_losses(self) -> dict[str, list[torch.Tensor]]:
        """The loss components recorded since the last optimizer step (and forget them); the step's
        inputs are kept until the next step's first micro-batch (``step_inputs_finite``)."""
        losses, self._step_losses = self._step_losses, defaultdict(list)
        self._step_inputs, self._last_step_inputs = [], self._step_inputs
        return losses

    def step_inputs_finite(self) -> bool:
        """Whether every float input of the last checked step was finite (only asked after a
        non-finite loss: a NaN in the prompts says nothing about the weights)."""
        return all(
            bool(torch.isfinite(value).all())
            for inputs in getattr(self, "_last_step_inputs", [])
            for value in inputs.values()
            if isinstance(value, torch.Tensor) and value.is_floating_point()
        )

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
        if model.training:
            self._step_inputs.append(inputs)
        settings = self.conml_args
        weight = settings.lambda_at(self.state.global_step)
        if not (weight > 0 and model.training and "probes" in inputs):
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
        loss = outputs.loss + weight * terms.loss
        self._record(loss, icl_loss=outputs.loss, conml_loss=terms.loss, d_in=terms.d_in, d_out=terms.d_out)
        if settings.conml_lambda_start or settings.conml_lambda_warmup:
            self._metrics["conml_lambda"].append(torch.tensor(weight))
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

    # ---- saving: the run's files in every folder the Trainer saves -------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` (weights + config), then ``write_run_files`` in the same folder.

        It saves each checkpoint (before the Trainer pushes it), the final model and what
        ``push_to_hub`` uploads. Called by the user (``_internal_call`` false) it pushes afterwards
        when ``push_to_hub`` is on, as the Trainer's own does, so the upload holds the run's files.
        """
        super().save_model(output_dir, _internal_call=True)
        if self.args.should_save:  # other processes of a multi-process run write nothing
            self.write_run_files(Path(output_dir if output_dir is not None else self.args.output_dir))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def write_run_files(self, folder: Path) -> None:
        """What a saved folder holds besides the Trainer's files.

        A LoRA model's folder gets its ``ICLConfig`` (the backbone to rebuild on; peft saves only
        the adapter) and, when pushing, the repo id as the adapter's base (``lora.record_repo_id``);
        each checkpoint gets a copy of the run's ``recipe.yaml``; every folder gets the model card.
        """
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):  # a peft model saves only its adapter files
            model.get_base_model().config.save_pretrained(folder)
            if self.args.push_to_hub:
                record_repo_id(folder, self.hub_model_id or push_repo_id(self.args))
        recipe = Path(self.args.output_dir) / RECIPE_NAME
        if recipe.is_file() and recipe.resolve() != (folder / RECIPE_NAME).resolve():
            write_bytes(folder / RECIPE_NAME, recipe.read_bytes())  # never through a link
        self.write_card(folder)

    def write_card(self, folder: Path) -> None:
        """``folder/README.md`` with the live log history and ConML settings (``model_card``).

        A card is documentation: a failure to write one (say, a malformed results.json someone
        dropped in) must never stop a training run or lose its checkpoint; it is logged.
        """
        try:
            write_model_card(
                folder,
                log_history=self.state.log_history,
                conml_settings=dataclasses.asdict(self.conml_args),
                repo_id=self.hub_model_id or self.args.hub_model_id,
            )
        except Exception as error:  # noqa: BLE001
            logger.warning(
                "could not write the model card in %s: %s: %s", folder, type(error).__name__, error
            )

    def create_model_card(self, **kwargs) -> None:
        """Called by ``Trainer.push_to_hub`` right before the upload: our card, not the generic one."""
        if self.is_world_process_zero():
            self.write_card(Path(self.args.output_dir))


class CheckpointCardOnPush(TrainerCallback):
    """Before a checkpoint push, bring the checkpoint's card into ``output_dir``.

    The Trainer pushes a checkpoint by copying its weights and config into ``output_dir`` and
    uploading ``output_dir``; ``on_push_begin`` runs right before that (on the main process), so
    the repo's card follows the weights it describes. (Also called at the start of
    ``push_to_hub``, whose ``save_model`` then writes the final card over it.)
    """

    def on_push_begin(self, args, state, control, **kwargs):
        card = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / "README.md"
        if state.is_world_process_zero and card.is_file():
            shutil.copy(card, Path(args.output_dir) / "README.md")
        return control
