"""The context manager around a training run: lock, stop signals and record, and early stops as one line.

``RunGuard`` wraps ``train.run`` and puts three pieces together, each in its own module:

- ``lock.OutputDirLock``: one run per ``output_dir`` (only the main process locks; every
  process gets its answer);
- ``preemption.StopOnSignal``: SIGTERM/SIGUSR1 save a checkpoint at the next step end, then the
  run stops with ``RunInterrupted`` (exit 75); Ctrl-C gives ``RunInterrupted`` with exit 130;
- ``record.RunRecord``: ``run_status.json`` and ``run_history.jsonl`` (start, trained, end);

and a failed write to ``output_dir`` becomes ``storage.StorageError`` (exit 74).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..distributed import broadcast
from ..errors import EXIT_CTRL_C, EXIT_INTERRUPTED
from . import RunError
from .checkpoints import latest_checkpoint
from .lock import OutputDirLock
from .preemption import RunInterrupted, StopOnSignal, remove_jit_checkpoint
from .record import RunRecord
from .storage import storage_error


class LockCheck(TrainerCallback):
    """``RunGuard.verify_lock`` at each step that saves a checkpoint, before the save (and before
    the Trainer deletes old checkpoints). Added after the stop callback: sees its ``should_save``."""

    def __init__(self, guard: RunGuard) -> None:
        self.guard = guard

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.guard.verify_lock()
        return control


class RunGuard:
    """The lock, stop signals and record of one run segment (see the module docstring).

    Use as a context manager around the whole run; only the main process (``process_index`` 0)
    locks and writes, every process handles the stop signals. Leaving it on Ctrl-C raises
    ``RunInterrupted`` (130), on a failed write ``StorageError`` (74); any other error is recorded
    as ``failed`` and passes through.
    """

    def __init__(self, output_dir: str | Path, process_index: int = 0) -> None:
        self.output_dir = output_dir  # as given: messages name it the way the user wrote it
        self.main = process_index == 0
        self.lock = OutputDirLock(output_dir)
        self.stop = StopOnSignal()
        self.record = RunRecord(output_dir, self.main)
        self.trainer = None

    def __enter__(self) -> RunGuard:
        error = None
        if self.main:
            try:
                self.lock.acquire()
            except RunError as raised:
                error = str(raised)
        error = broadcast(error)  # every process stops if the main one could not lock
        if error is not None:
            raise RunError(error)
        self.stop.install()
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None or self.record.ended:
                return
            if issubclass(kind, KeyboardInterrupt):
                self.end("interrupted", signal="SIGINT")
                raise RunInterrupted(self._ctrl_c_message(), EXIT_CTRL_C) from None
            # A failed write (also safetensors' own error) is a StorageError (None for any other error).
            if issubclass(kind, Exception) and (storage := storage_error(value, self.output_dir, self.step)):
                self.end("failed", error=str(storage))
                raise storage from None
            self.end("failed", error=f"{kind.__name__}: {str(value).splitlines()[0] if str(value) else ''}")
        finally:
            self.stop.restore()
            if self.main:
                self.lock.release()

    # ---- wiring -------------------------------------------------------------------------------------
    def attach(self, trainer) -> None:
        """Add the stop callback to the Trainer (in place of transformers' JIT checkpointing), and
        the lock check before every checkpoint save."""
        self.trainer = trainer
        remove_jit_checkpoint(trainer)
        trainer.add_callback(self.stop)
        trainer.add_callback(LockCheck(self))

    def verify_lock(self) -> None:
        """Before anything is deleted or saved: ``.lock`` is still this run's (``OutputDirLock.verify``)."""
        if self.main:
            self.lock.verify()

    @property
    def step(self) -> int | None:
        return None if self.trainer is None else self.trainer.state.global_step

    # ---- record -------------------------------------------------------------------------------------
    def start(
        self, settings: dict[str, Any], start_step: int, resumed_from: str | None, **extra: Any
    ) -> None:
        """Record the start of a segment: history entry and status ``running``."""
        self.record.start(settings, start_step, resumed_from, **extra)

    def trained(self, metrics: dict[str, Any]) -> None:
        """Record the training metrics before the final save (a kill during it keeps them)."""
        self.record.trained(self.step, metrics)

    def end(self, status: str, **details: Any) -> None:
        """Record how the segment ended: ``finished``, ``interrupted`` or ``failed``."""
        self.record.end(status, self.step, **details)

    # ---- stopping early -----------------------------------------------------------------------------
    def end_if_stopped(self, max_steps: int) -> None:
        """After ``trainer.train()``: if a stop signal ended it before ``max_steps``, record the
        segment as interrupted and raise ``RunInterrupted`` (exit 75; its checkpoint is saved)."""
        stopped = self.stop.stopped_at
        if stopped is None or stopped >= max_steps:
            return
        checkpoint = str(Path(self.output_dir) / f"checkpoint-{stopped}")
        name = signal.Signals(self.stop.signal).name
        self.end("interrupted", signal=name, checkpoint=checkpoint)
        raise RunInterrupted(
            f"stopped by {name} after step {stopped} of {max_steps}: saved {checkpoint}, no final "
            f"model; resume with --resume_from_checkpoint latest (exit status {EXIT_INTERRUPTED})",
            EXIT_INTERRUPTED,
        )

    def _ctrl_c_message(self) -> str:
        step = self.step
        where = (
            f" at step {step} of {self.trainer.args.max_steps}"
            if step is not None
            else " before training started"
        )
        last = latest_checkpoint(self.output_dir, verify=False)
        kept = (
            f"the last checkpoint is {last}: resume with --resume_from_checkpoint latest"
            if last
            else "no checkpoint was saved"
        )
        return f"interrupted (Ctrl-C){where}; {kept}"
