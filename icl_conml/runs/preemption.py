"""Preemption that saves: stop signals end a run at a step boundary with a complete checkpoint.

SIGTERM (what SLURM and Kubernetes send before a kill) and SIGUSR1 (what ``#SBATCH --signal``
can send ahead of time) ask the run to stop: at the next step boundary every process saves its
share of a complete checkpoint, the run writes no final model and ends with ``RunInterrupted``
and exit status ``EXIT_INTERRUPTED`` (75, ``EX_TEMPFAIL``: "try again"), so that a requeue script
resumes it with ``--resume_from_checkpoint latest``. Ctrl-C (SIGINT) stops at once, with one line
naming the last checkpoint (``RunInterrupted`` with ``EXIT_CTRL_C``, 130).
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch
from transformers import TrainerCallback

from ..distributed import reduce_max
from ..errors import EXIT_CTRL_C, CommandError
from .signals import SignalHandlers

logger = logging.getLogger("icl_conml")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunInterrupted(CommandError):
    """The run stopped before its end (a stop signal or Ctrl-C); the message is one line, the exit
    status ``code``: ``EXIT_INTERRUPTED`` (75) after a signal stop, ``EXIT_CTRL_C`` (130)."""

    label = ""  # "icl_conml: stopped by SIGUSR1 after step ...": an outcome, not an error

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = self.exit_code = code
        # --traceback shows where Ctrl-C struck; a signal stop is requested, not a failure.
        self.traceback_on_request = code == EXIT_CTRL_C


class StopOnSignal(SignalHandlers, TrainerCallback):
    """SIGTERM/SIGUSR1 → save a checkpoint at the next step boundary and stop training.

    The flag is reduced over processes at every step end, so every process stops after the
    same step and saves its share of the same checkpoint (only some of them may have been
    signalled). The Trainer's own ``enable_jit_checkpoint`` is not needed (and is removed):
    after its checkpoint the run would still write a final model and log "finished".
    """

    handled_signals = STOP_SIGNALS

    def __init__(self) -> None:
        super().__init__()
        self.signal: int | None = None
        self.stopped_at: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
            logger.warning(
                "%s received: saving a checkpoint at the end of this step, then stopping",
                signal.Signals(signum).name,
            )

    def on_step_end(self, args, state, control, **kwargs):
        flag = torch.tensor(1.0 if self.signal is not None else 0.0)
        if float(reduce_max(flag.to(args.device))) == 0:
            return control
        if self.signal is None:  # another process was signalled
            self.signal = int(signal.SIGTERM)
        self.stopped_at = state.global_step
        control.should_save = True
        control.should_training_stop = True
        return control


def remove_jit_checkpoint(trainer) -> None:
    """Take transformers' ``JITCheckpointCallback`` (``enable_jit_checkpoint``) off ``trainer`` and give
    SIGTERM back to its previous handler: ``StopOnSignal`` handles it instead."""
    from transformers.trainer_jit_checkpoint import JITCheckpointCallback

    for callback in list(trainer.callback_handler.callbacks):
        if isinstance(callback, JITCheckpointCallback):
            trainer.remove_callback(callback)
            manager = callback.jit_manager
            if manager is not None and manager._original_sigterm_handler is not None:
                signal.signal(signal.SIGTERM, manager._original_sigterm_handler)
            logger.info("enable_jit_checkpoint: SIGTERM is handled by icl_conml (checkpoint, then exit 75)")
