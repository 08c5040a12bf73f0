"""Training callbacks: stop on a non-finite loss; readable logs and a training-curve plot.

The console, the logs and the run folder (``ConsoleProgress``/``ConsolePrinter``: one line per log
with the step and no epoch; ``NormalisedTrainingError``: ``icl_error`` on the evaluation's scale;
``TrainingCurvesPlot``: ``training_curves.png``) are described at the end of this module.

The Trainer's own ``logging_nan_inf_filter`` hides NaN/inf losses from the logs and keeps
training on poisoned weights. ``NonFiniteLossGuard`` checks every optimizer step twice:

- *before* ``optimizer.step()`` (the ``on_pre_optimizer_step`` event): if the step's loss, one
  of its components (icl_loss, conml_loss, d_in, d_out) or the gradient norm *before clipping*
  is not finite, it raises ``NonFiniteLossError``, so the bad update is never applied (clipping
  an infinite norm scales every gradient to 0: the run would go on without ever learning);
- *after* it (``on_step_end``, which runs before the Trainer logs, evaluates or saves): finite
  gradients can still give a non-finite update (an infinite or enormous learning rate, a NaN
  weight decay or Adam epsilon); if any trainable weight is NaN/inf it raises too.

Raising there means no checkpoint of that step is written, and every checkpoint that was
written held finite weights. Finite is not enough to be *good*: a checkpoint's weights are
judged by the loss they gave at the next step. The message names as the last good checkpoint
the newest one whose next-step loss was finite and not exploding, that is at most
``EXPLODING_FACTOR`` times the lowest loss of the run segment so far (a checkpoint whose next
step was not seen in this segment is judged by its own finite weights only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .distributed import reduce_max
from .errors import EXIT_NON_FINITE, CommandError
from .runs.checkpoints import check_checkpoint, checkpoint_step, checkpoints_newest_first


class NonFiniteLossError(CommandError, RuntimeError):
    """Training hit a NaN/inf loss or gradient; the message is one line for the user (exit 3)."""

    exit_code = EXIT_NON_FINITE


#: A checkpoint is not "good" if the loss its weights gave at the next step was above this many
#: times the lowest loss the run segment had reached (a diverging run, although finite).
EXPLODING_FACTOR = 100.0


class NonFiniteLossGuard(TrainerCallback):
    """Raise ``NonFiniteLossError`` at the first optimizer step with a non-finite loss or gradient.

    Args:
        step_losses: returns and clears the loss components recorded since the last optimizer
            step, ``{"loss": [...], "icl_loss": [...], ...}`` with one detached scalar per
            micro-batch (``ConMLTrainer.pop_step_losses``).
        pre_clip_grad_norm: the gradient norm the Trainer measured before clipping this step
            (``None`` where it is not known: then the norm of the gradients as they are).
        inputs_finite: whether the failed step's prompts were finite (asked only after a failure):
            a NaN in the data does not condemn the weights that met it.
    """

    def __init__(
        self,
        step_losses: Callable[[], dict[str, list[torch.Tensor]]],
        pre_clip_grad_norm: Callable[[], object] | None = None,
        inputs_finite: Callable[[], bool] | None = None,
    ) -> None:
        self.step_losses = step_losses
        self.pre_clip_grad_norm = pre_clip_grad_norm or (lambda: None)
        self.inputs_finite = inputs_finite or (lambda: True)
        #: step N -> the loss (max over processes) that checkpoint-N's weights gave at step N + 1.
        self.next_loss: dict[int, float] = {}
        self.lowest_loss = math.inf

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        means = {
            key: torch.stack(values).float().mean() for key, values in self.step_losses().items() if values
        }
        # Under ZeRO/FSDP gradients may live outside p.grad: then only the losses are checked.
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        grad_norm = torch.nn.utils.get_total_norm(grads).float() if grads else torch.zeros(())
        pre_clip = self.pre_clip_grad_norm()
        if pre_clip is not None:  # clipping scales an infinite norm's gradients to 0: check the norm before
            grad_norm = torch.as_tensor(pre_clip).detach().float().to(grad_norm.device).reshape(())
        checked = [value.to(grad_norm.device) for value in means.values()] + [grad_norm]
        bad = (~torch.isfinite(torch.stack(checked))).any().float()
        loss = means.get("loss", torch.zeros(())).to(grad_norm.device)
        loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, math.inf))
        # One reduction (NCCL reduces only device tensors): any process bad, the highest loss.
        bad_anywhere, highest = reduce_max(torch.stack([bad, loss]).to(args.device)).tolist()
        if bad_anywhere == 0:
            self.next_loss[state.global_step] = highest
            self.lowest_loss = min(self.lowest_loss, highest)
            return control
        data_bad = torch.tensor(0.0 if self.inputs_finite() else 1.0)
        data_bad = float(reduce_max(data_bad.to(args.device))) > 0  # every process is here
        if not data_bad:  # the weights of the step before met finite prompts: they gave this loss
            self.next_loss[state.global_step] = highest
        raise NonFiniteLossError(
            _message(
                args,
                state.global_step + 1,
                means,
                float(grad_norm),
                self.last_good(args.output_dir),
                data_bad,
            )
        )

    def last_good(self, output_dir: str | None) -> tuple[str | None, list[str]]:
        """The newest intact checkpoint whose weights gave a finite, not exploding loss at the next
        step (see the module docstring), and why each newer one is not good."""
        if not output_dir:
            return None, []
        passed: list[str] = []
        for checkpoint in checkpoints_newest_first(output_dir):
            step = checkpoint_step(checkpoint)
            loss = self.next_loss.get(step) if step is not None else None
            if loss is not None and not math.isfinite(loss):
                passed.append(
                    f"{Path(checkpoint).name} (its weights gave a non-finite loss at step {step + 1})"
                )
                continue
            if loss is not None and loss > EXPLODING_FACTOR * self.lowest_loss:
                passed.append(
                    f"{Path(checkpoint).name} (its weights gave loss {loss:.4g} at step {step + 1}, over "
                    f"{EXPLODING_FACTOR:g}x the run's lowest {self.lowest_loss:.4g}: exploding)"
                )
                continue
            if check_checkpoint(checkpoint) is None:
                return checkpoint, passed
        return None, passed

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
        poisoned = [n for n, t in named if t.numel() and not torch.isfinite(t).all()]
        raise NonFiniteLossError(
            _update_message(args, state.global_step, poisoned, len(named), self.last_good(args.output_dir))
        )


def _kept(args, last_good: tuple[str | None, list[str]]) -> tuple[str, str]:
    """``(what is kept, how to go on)``: the last good checkpoint and the exact resume command."""
    last, passed = last_good
    lower = f"--learning_rate {args.learning_rate / 10:g}"
    start_over = f"start over with a lower learning rate ({lower} --overwrite_output_dir true)"
    if not checkpoints_newest_first(args.output_dir or ""):
        return "no checkpoint had been saved yet", start_over
    not_good = f" ({'; '.join(passed[:2])} {'is' if len(passed) == 1 else 'are'} not)" if passed else ""
    if last is None:
        return f"no checkpoint is known to be good{not_good}", start_over
    return (
        f"the last good checkpoint is {last}{not_good}",
        f"resume with --resume_from_checkpoint {last} {lower} --resume_allow_changes learning_rate (the change is "
        f"recorded in run_history.jsonl)",
    )


def _update_message(args, step: int, poisoned: list[str], total: int, last_good) -> str:
    shown = ", ".join(poisoned[:3]) + (", ..." if len(poisoned) > 3 else "")
    where = (
        f"{len(poisoned)} of {total} weight tensors ({shown})" if poisoned else "weights on another process"
    )
    settings = (
        f"learning_rate={args.learning_rate:g}, weight_decay={args.weight_decay:g}, "
        f"adam_epsilon={args.adam_epsilon:g}"
    )
    kept, go_on = _kept(args, last_good)
    return (
        f"non-finite weights after the update of step {step}: {where} became NaN/inf although the loss and "
        f"gradients were finite ({settings}); nothing from step {step} was saved and {kept}. Lower "
        f"learning_rate (or fix weight_decay/adam_epsilon): {go_on}"
    )


def _message(
    args, step: int, means: dict[str, torch.Tensor], grad_norm: float, last_good, data_bad: bool = False
) -> str:
    parts = [f"{key}={float(value):.6g}" for key, value in sorted(means.items())]
    parts.append(f"grad_norm={grad_norm:.6g}")
    if all(math.isfinite(float(value)) for value in means.values()) and math.isfinite(grad_norm):
        parts.append("non-finite on another process")
    if data_bad:
        parts.append("the step's prompts hold NaN/inf: check the data")
    kept, go_on = _kept(args, last_good)
    if data_bad:
        last = last_good[0]
        resume = f"resume with --resume_from_checkpoint {last}" if last else "start over"
        fix = f"Fix the data (or the task's noise/scale settings), then {resume}"
    else:
        fix = f"Lower learning_rate, raise warmup_steps or check the task's noise/scale settings: {go_on}"
    return (
        f"non-finite loss at step {step} ({', '.join(parts)}); training stopped before this update, "
        f"nothing from step {step} was saved and {kept}. {fix}"
    )


# ---- what the console and the run folder show --------------------------------------------------------
#: Keys never shown on the console: the data is generated per step, so an "epoch" means nothing, and
#: the per-k curve (``eval_error_at_k/K``) and throughput go to log_history and the trackers only.
HIDDEN_KEYS = ("epoch", "total_flos")
HIDDEN_PREFIXES = ("eval_error_at_k/", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def console_line(logs: dict[str, float], step: int, max_steps: int) -> str:
    """One console line for a Trainer log: ``step 100/8000: loss 4.93, icl_error 0.986, ...``.

    Evaluation logs read ``step 100/8000 eval: loss ..., error_at_d ...``; the final training
    metrics ``step 8000/8000 done: train_runtime 299 s, ...``.
    """
    shown = {
        key: value
        for key, value in logs.items()
        if key not in HIDDEN_KEYS and not key.startswith(HIDDEN_PREFIXES)
    }
    kind = ""
    if any(key.startswith("eval_") for key in shown):
        kind = " eval"
        shown = {key.removeprefix("eval_"): value for key, value in shown.items()}
    elif "train_runtime" in shown:
        kind = " done"
    parts = []
    for key, value in shown.items():
        if key == "learning_rate":
            key = "lr"
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        if key.endswith("runtime"):
            text += " s"
        parts.append(f"{key} {text}")
    return f"step {step}/{max_steps}{kind}: " + ", ".join(parts)


class ConsoleProgress(ProgressCallback):
    """transformers' progress bar with readable log lines: the step, no epoch (``console_line``)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(console_line(logs, state.global_step, state.max_steps))


class ConsolePrinter(PrinterCallback):
    """The log lines of ``disable_tqdm: true`` runs (``console_line``), without a progress bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(console_line(logs, state.global_step, state.max_steps), flush=True)


def use_console_lines(trainer) -> None:
    """Replace the Trainer's progress/printer callback by ``ConsoleProgress``/``ConsolePrinter``,
    and hide transformers' own bars from here on (one per checkpoint's "Writing model shards")."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    for default, ours in ((ProgressCallback, ConsoleProgress), (PrinterCallback, ConsolePrinter)):
        if trainer.pop_callback(default) is not None:
            trainer.add_callback(ours())


class NormalisedTrainingError(TrainerCallback):
    """Add ``icl_error`` to every training log: ``icl_loss`` divided by the task's error normaliser.

    The evaluation reports the squared error divided by the function class's normaliser (d for
    linear regression: predicting 0 scores about 1); ``icl_loss`` is the raw squared error, so
    5 means "predicts 0" at d = 5. ``icl_error`` is on the evaluation's scale, averaged over every
    context length k of the step's training prompts (under a curriculum the prompts have fewer
    active dimensions and points, so it reads lower than the full task's error). It costs one
    division per log. Only for classes whose loss is the squared error their error normalises.

    It must run before the reporting callbacks: ``add_to`` puts it first.
    """

    def __init__(self, normaliser: float) -> None:
        self.normaliser = float(normaliser)

    @classmethod
    def add_to(cls, trainer, task) -> None:
        """Add it in front of the Trainer's callbacks when ``task``'s loss and error allow it."""
        from .tasks import FunctionClass

        kind = type(task)
        if kind.loss is not FunctionClass.loss or kind.error is not FunctionClass.error:
            return
        trainer.callback_handler.callbacks.insert(0, cls(task.error_normaliser))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "icl_loss" not in logs:
            return control
        logs["icl_error"] = round(float(logs["icl_loss"]) / self.normaliser, 6)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("icl_loss") == logs["icl_loss"]:
            last["icl_error"] = logs["icl_error"]  # the Trainer appended its copy before on_log
        return control


class TrainingCurvesPlot(TrainerCallback):
    """At the end of training, ``output_dir/training_curves.png``: training loss and the normalised
    error against the step (``training_plot.plot_training_curves``); matplotlib is optional."""

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not args.output_dir:
            return control
        from .training_plot import write_training_curves

        write_training_curves(state.log_history, args.output_dir)
        return control


def add_run_callbacks(trainer, task) -> None:
    """The console lines, ``icl_error`` and the training-curve plot of a ``train`` run."""
    use_console_lines(trainer)
    NormalisedTrainingError.add_to(trainer, task)
    trainer.add_callback(TrainingCurvesPlot())
