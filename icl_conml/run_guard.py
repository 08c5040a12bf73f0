"""One run per ``output_dir``, preemption that saves, and a truthful record of every run segment.

``RunGuard`` wraps a training run (``train.run``):

- **Lock.** The main process holds ``fcntl.flock`` on ``output_dir/.lock`` for the whole run,
  with its pid, host and start time written inside; a second run into the same folder is refused
  in one line naming the holder. An flock vanishes with its process, so a lock left by a run that
  was killed (``kill -9``, out of memory, a node crash) is *stale*: its record still says "held"
  but nobody holds the flock. On the same host that proves the owner is gone; the new run takes
  the lock over and says so in a warning naming the dead owner (refusing would make every
  requeue after a hard kill need a human). An owner on another host may be alive on a
  filesystem whose locks do not reach across hosts, so its record must also have stopped being
  refreshed (a heartbeat every ``HEARTBEAT_S``): the run waits until it is ``STALE_AFTER_S`` old,
  and refuses if the owner refreshes it meanwhile.
- **Preemption.** SIGTERM (what SLURM and Kubernetes send before a kill) and SIGUSR1 (what
  ``#SBATCH --signal`` can send ahead of time) ask the run to stop: at the next step boundary
  it saves a complete checkpoint, writes no final model, marks ``run_status.json`` as
  ``interrupted`` and exits with ``EXIT_INTERRUPTED`` (75, ``EX_TEMPFAIL``: "try again"), so
  that a requeue script resumes it with ``--resume_from_checkpoint latest``. Ctrl-C (SIGINT)
  stops at once, with one line naming the last checkpoint (exit 130).
- **Record.** ``run_status.json`` says what the run is doing now (running, interrupted, failed,
  finished) and ``run_history.jsonl`` keeps one entry per segment (start: the resolved settings,
  the step it starts from, what changed since the previous segment; end: how it ended).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .arguments import RecipeError
from .errors import EXIT_CTRL_C, CommandError
from .errors import EXIT_INTERRUPTED as EXIT_INTERRUPTED  # the status of a signal stop (re-exported)

logger = logging.getLogger("icl_conml")

LOCK_NAME = ".lock"
STATUS_NAME = "run_status.json"
HISTORY_NAME = "run_history.jsonl"
#: Seconds between refreshes of the lock file's time stamp by its holder.
HEARTBEAT_S = 20.0
#: A lock record of another host not refreshed for this long belongs to a dead run.
STALE_AFTER_S = 3 * HEARTBEAT_S
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


#: Exit status when writing to output_dir failed (the disk is full, a quota, an I/O error: EX_IOERR).
EXIT_STORAGE = 74
_TORCH_WRITE_FAILURES = (
    "unexpected pos",
    "PytorchStreamWriter failed",
    "file write failed",
    "iostream error",
)


class StorageError(CommandError):
    """Writing the run's files failed (disk full, quota, I/O error); one line, exit ``EXIT_STORAGE``."""

    exit_code = EXIT_STORAGE


def storage_error(error: BaseException, output_dir: str | Path, step: int | None) -> StorageError | None:
    """A ``StorageError`` explaining ``error`` if it is a failed write (else ``None``).

    The disk filling up surfaces as ``OSError(ENOSPC)`` from Python writes, or as torch's
    ``[enforce fail at inline_container.cc] unexpected pos`` from ``torch.save``, which never
    says "no space"; both are reported with the free space and what to do.
    """
    chain = _chain(error)
    texts = [str(e) for e in chain]
    errnos = {getattr(e, "errno", None) for e in chain}
    torch_write = isinstance(error, RuntimeError) and any(
        m in t for t in texts for m in _TORCH_WRITE_FAILURES
    )
    if not (errnos & {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS} or torch_write):
        return None
    try:
        usage = shutil.disk_usage(output_dir)
        free = f"{usage.free / 1e6:,.1f} MB free of {usage.total / 1e6:,.1f} MB"
        full = usage.free < max(64e6, 0.001 * usage.total)
    except OSError:
        free, full = "free space unknown", False
    if errno.EDQUOT in errnos:
        what = "the disk quota is exceeded"
    elif errno.ENOSPC in errnos or (torch_write and full):
        what = "no space left on device"
    elif errno.EROFS in errnos:
        what = "the filesystem is read-only"
    else:
        what = f"a write failed ({texts[0].splitlines()[0][:120] if texts[0] else type(error).__name__})"
    from .checkpoints import latest_checkpoint

    last = latest_checkpoint(output_dir, verify=False)
    kept = f"the newest complete checkpoint is {last}" if last else "no checkpoint was saved"
    at = f" at step {step}" if step is not None else ""
    return StorageError(
        f"{what} in output_dir={str(output_dir)!r} ({free}) while writing the run's files{at}; {kept}. "
        f"Free some space (or move output_dir), then resume with --resume_from_checkpoint latest"
    )


def _chain(error: BaseException) -> list[BaseException]:
    found, cause = [], error
    while cause is not None and len(found) < 5:
        found.append(cause)
        cause = cause.__cause__ or cause.__context__
    return found


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a temporary file renamed over the old one): never a half-written file."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(json.dumps(data, indent=1, default=str) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(record: dict[str, Any]) -> str:
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"


# ---- the lock --------------------------------------------------------------------------------------
class OutputDirLock:
    """An exclusive lock on ``output_dir`` for the life of a run (see the module docstring)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._fd: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``RecipeError`` (one line) naming who holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RecipeError(
                f"output_dir={str(self.output_dir)!r} is not writable ({error.strerror}): cannot create "
                f"{LOCK_NAME} there; pick a writable folder"
            ) from None
        try:
            flock_works = self._flock(fd)
            previous = self._read(fd)
            if previous.get("state") == "held":
                self._check_stale(previous, flock_works)
            self._fd = fd
            self._write_record(
                {"state": "held", "pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
            )
        except BaseException:
            os.close(fd)
            self._fd = None
            raise
        self._heartbeat = threading.Thread(target=self._beat, name="icl_conml-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _flock(self, fd: int) -> bool:
        """flock the file; False where the filesystem does not support flock (then the record decides)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            raise RecipeError(
                f"output_dir={str(self.output_dir)!r} is in use by another run ({_describe(holder)}); "
                f"wait for it to end, stop it, or choose another output_dir"
            ) from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            logger.warning(
                "%s: this filesystem does not support file locks (%s); relying on the lock record",
                self.path,
                error.strerror,
            )
            return False
        return True

    def _check_stale(self, previous: dict[str, Any], flock_works: bool) -> None:
        """The record says "held" but we got the flock: its owner died without releasing it."""
        here = socket.gethostname()
        where = str(self.output_dir)
        if previous.get("host") == here:
            pid = int(previous.get("pid") or 0)
            if not flock_works and pid and pid != os.getpid() and _pid_alive(pid):
                raise RecipeError(
                    f"output_dir={where!r} is in use by another run ({_describe(previous)}); "
                    f"wait for it to end, stop it, or choose another output_dir"
                )
        else:
            self._wait_until_stale(previous)
        logger.warning(
            "output_dir=%r: taking over the lock of a run that ended without releasing it (%s; killed or "
            "crashed). Resume its work with --resume_from_checkpoint latest, or start over with "
            "--overwrite_output_dir true",
            where,
            _describe(previous),
        )

    def _wait_until_stale(self, previous: dict[str, Any]) -> None:
        """Another host's record: wait until it has not been refreshed for ``STALE_AFTER_S``."""
        last = self.path.stat().st_mtime
        while (age := time.time() - last) < STALE_AFTER_S:
            wait = STALE_AFTER_S - age
            logger.warning(
                "output_dir=%r is locked by %s, last refreshed %.0f s ago; waiting %.0f s to see if it is alive",
                str(self.output_dir),
                _describe(previous),
                age,
                wait,
            )
            time.sleep(min(wait, HEARTBEAT_S) + 0.1)
            now = self.path.stat().st_mtime
            if now != last:
                raise RecipeError(
                    f"output_dir={str(self.output_dir)!r} is in use by a run on another host "
                    f"({_describe(previous)}; its lock is still being refreshed); wait for it to end, stop "
                    f"it, or choose another output_dir"
                )

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 65536).decode("utf-8", "replace")
            record = json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _write_record(self, record: dict[str, Any]) -> None:
        assert self._fd is not None
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Mark the record released and drop the flock (the file stays: deleting it races)."""
        if self._fd is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            self._write_record({"state": "released", "pid": os.getpid(), "host": socket.gethostname()})
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


# ---- stop signals -------------------------------------------------------------------------------------
class StopOnSignal(TrainerCallback):
    """SIGTERM/SIGUSR1 → save a checkpoint at the next step boundary and stop training.

    The flag is reduced over processes at every step end, so every process stops after the
    same step and saves its share of the same checkpoint (only some of them may have been
    signalled). The Trainer's own ``enable_jit_checkpoint`` is not needed (and is removed):
    after its checkpoint the run would still write a final model and log "finished".
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
            logger.warning(
                "%s received: saving a checkpoint at the end of this step, then stopping",
                signal.Signals(signum).name,
            )

    def on_step_end(self, args, state, control, **kwargs):
        flag = torch.tensor(1.0 if self.signal is not None else 0.0)
        if _reduce_max(flag, args.device) == 0:
            return control
        if self.signal is None:  # another process was signalled
            self.signal = int(signal.SIGTERM)
        self.stopped_at = state.global_step
        control.should_save = True
        control.should_training_stop = True
        return control


def _reduce_max(flag: torch.Tensor, device: torch.device) -> float:
    from .callbacks import reduce_max

    return float(reduce_max(flag.to(device)))


def _remove_jit_checkpoint(trainer) -> None:
    from transformers.trainer_jit_checkpoint import JITCheckpointCallback

    for callback in list(trainer.callback_handler.callbacks):
        if isinstance(callback, JITCheckpointCallback):
            trainer.remove_callback(callback)
            manager = callback.jit_manager
            if manager is not None and manager._original_sigterm_handler is not None:
                signal.signal(signal.SIGTERM, manager._original_sigterm_handler)
            logger.info("enable_jit_checkpoint: SIGTERM is handled by icl_conml (checkpoint, then exit 75)")


# ---- the run's record --------------------------------------------------------------------------------
def read_history(output_dir: str | Path) -> list[dict[str, Any]]:
    """The entries of ``run_history.jsonl`` (a line cut short by a kill is skipped)."""
    path = Path(output_dir) / HISTORY_NAME
    entries = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    for line in lines:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def read_status(output_dir: str | Path) -> dict[str, Any]:
    try:
        status = json.loads((Path(output_dir) / STATUS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: keep non-finite numbers as strings."""
    return {
        key: value if not isinstance(value, float) or math.isfinite(value) else str(value)
        for key, value in metrics.items()
    }


class RunGuard:
    """The lock, stop signals and record of one run segment (see the module docstring).

    Use as a context manager around the whole run; only the main process (``process_index`` 0)
    locks and writes, every process handles the stop signals.
    """

    def __init__(self, output_dir: str | Path, process_index: int = 0) -> None:
        self.output_dir = Path(output_dir)
        self.main = process_index == 0
        self.lock = OutputDirLock(self.output_dir)
        self.stop = StopOnSignal()
        self.trainer = None
        self.segment: int | None = None
        self.ended = False

    def __enter__(self) -> RunGuard:
        error = None
        if self.main:
            try:
                self.lock.acquire()
            except RecipeError as raised:
                error = str(raised)
        error = _broadcast(error)  # every process stops if the main one could not lock
        if error is not None:
            raise RecipeError(error)
        self.stop.install()
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is not None and not self.ended:
                if issubclass(kind, KeyboardInterrupt):
                    self.end("interrupted", signal="SIGINT")
                else:
                    self.end(
                        "failed", error=f"{kind.__name__}: {str(value).splitlines()[0] if str(value) else ''}"
                    )
        finally:
            self.stop.restore()
            if self.main:
                self.lock.release()

    # ---- wiring -------------------------------------------------------------------------------------
    def attach(self, trainer) -> None:
        """Add the stop callback to the Trainer (in place of transformers' JIT checkpointing)."""
        self.trainer = trainer
        _remove_jit_checkpoint(trainer)
        trainer.add_callback(self.stop)

    @property
    def step(self) -> int | None:
        return None if self.trainer is None else self.trainer.state.global_step

    # ---- record -----------------------------------------------------------------------------------
    def start(
        self, settings: dict[str, Any], start_step: int, resumed_from: str | None, **extra: Any
    ) -> None:
        """Record the start of a segment: history entry and status ``running``."""
        if not self.main:
            return
        history = read_history(self.output_dir)
        self.segment = 1 + max((int(e.get("segment") or 0) for e in history), default=0)
        entry = {
            "event": "start",
            "segment": self.segment,
            "time": _now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_step": start_step,
            "resumed_from": resumed_from,
            **extra,
            "settings": settings,
        }
        self._append(entry)
        self._status("running", step=start_step)

    def trained(self, metrics: dict[str, Any]) -> None:
        """Record the training metrics before the final save (a kill during it keeps them)."""
        if self.main:
            self._append({"event": "trained", "segment": self.segment, "time": _now(), "step": self.step,
                          "metrics": _finite(metrics)})  # fmt: skip

    def recorded_metrics(self, step: int) -> dict[str, Any]:
        """The training metrics an earlier segment recorded on reaching ``step`` (empty if none)."""
        for entry in reversed(read_history(self.output_dir)):
            if (
                entry.get("event") in ("trained", "end")
                and entry.get("step") == step
                and entry.get("metrics")
            ):
                return entry["metrics"]
        return {}

    def end(self, status: str, **details: Any) -> None:
        """Record how the segment ended: ``finished``, ``interrupted`` or ``failed``."""
        self.ended = True
        if not self.main or self.segment is None:
            return  # refused before it started: the folder's record stays as it was
        from .checkpoints import latest_checkpoint

        step = self.step
        with contextlib.suppress(Exception):
            details.setdefault("last_checkpoint", latest_checkpoint(self.output_dir, verify=False))
        details = _finite(details)
        with contextlib.suppress(OSError):
            self._append({"event": "end", "segment": self.segment, "time": _now(), "status": status,
                          "step": step, **details})  # fmt: skip
            self._status(status, step=step, **details)

    def _status(self, status: str, **details: Any) -> None:
        _write_json(self.output_dir / STATUS_NAME, {"status": status, **details, "time": _now()})

    def _append(self, entry: dict[str, Any]) -> None:
        with open(self.output_dir / HISTORY_NAME, "a") as stream:
            stream.write(json.dumps(entry, default=str) + "\n")
            stream.flush()
            os.fsync(stream.fileno())


# ---- honest resumes ---------------------------------------------------------------------------------------
#: Training keys whose change makes a resumed run a different experiment than the one it continues.
EXPERIMENT_TRAINING_KEYS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "global_batch_size",
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "optim",
    "optim_args",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "seed",
    "data_seed",
    "bf16",
    "fp16",
)
#: Schedules that do not depend on max_steps: a longer (or shorter) run keeps its learning rates.
STEADY_SCHEDULES = ("constant", "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau")


def _is_experiment_key(key: str) -> bool:
    from .arguments import ConMLArguments, ModelArguments, TaskArguments

    if key in EXPERIMENT_TRAINING_KEYS:
        return True
    sections = (ModelArguments, TaskArguments, ConMLArguments)
    # Evaluation keys (eval_n_prompts, eval_set, ...) only change what is measured, not what is trained.
    return any(key in section.__dataclass_fields__ for section in sections) and not key.startswith("eval_")


def recorded_settings(checkpoint: str | Path) -> tuple[dict[str, Any], str]:
    """The settings of the run a checkpoint belongs to (its newest segment), and where they come from.

    The run's ``run_history.jsonl`` records every key and the global batch; a run from before it
    existed has only ``recipe.yaml`` (in the checkpoint, or next to it): the keys it holds are
    compared, the others cannot be.
    """
    run_dir = Path(checkpoint).parent
    for entry in reversed(read_history(run_dir)):
        if entry.get("event") == "start" and isinstance(entry.get("settings"), dict):
            settings = dict(entry["settings"])
            if "global_batch_size" in entry:
                settings["global_batch_size"] = entry["global_batch_size"]
            return settings, str(run_dir / HISTORY_NAME)
    import yaml

    for path in (Path(checkpoint) / "recipe.yaml", run_dir / "recipe.yaml"):
        try:
            saved = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(saved, dict):
            return saved, str(path)
    return {}, ""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(recipe, checkpoint: str, start_step: int, global_batch_size: int) -> dict[str, list[Any]]:
    """Compare a resume with the run it continues; returns the allowed changes (key: [old, new]).

    Refused in one line (``RecipeError``): a change of any key that alters the experiment
    (``EXPERIMENT_TRAINING_KEYS`` and every model/task/ConML key but the ``eval_*`` ones);
    ``max_steps`` below the checkpoint's step; another ``max_steps`` under a decaying schedule
    unless ``resume_extend_schedule`` (it re-plans the schedule). Everything else (logging,
    saving, evaluation, reporting, a longer run under a steady schedule) is allowed, and the
    caller records it in the run history.
    """
    training = recipe.training
    settings = {**recipe.to_dict(), "global_batch_size": global_batch_size}
    if start_step > training.max_steps:
        raise RecipeError(
            f"max_steps={training.max_steps} is below the step of {checkpoint} ({start_step}): that run is already "
            f"past it; resume with max_steps >= {start_step}, or start a new run in another output_dir"
        )
    recorded, source = recorded_settings(checkpoint)
    if not recorded:
        logger.warning(
            "%s: no record of the run's settings; the resume cannot be compared with them", checkpoint
        )
        return {}
    changes = {
        key: [recorded[key], settings[key]]
        for key in settings
        if key in recorded and not _same(recorded[key], settings[key])
    }
    refused = [key for key in changes if _is_experiment_key(key)]
    if refused:
        shown = ", ".join(f"{key} {_show(changes[key][0])} -> {_show(changes[key][1])}" for key in refused)
        raise RecipeError(
            f"resuming {checkpoint} would change the experiment ({shown}; recorded in {source}); resume with "
            f"the run's own settings (python -m icl_conml.train {Path(training.output_dir) / 'recipe.yaml'} "
            f"--resume_from_checkpoint latest) or start a new run in another output_dir"
        )
    if "max_steps" in changes:
        schedule = str(settings["lr_scheduler_type"])
        if schedule not in STEADY_SCHEDULES and not training.resume_extend_schedule:
            old, new = changes["max_steps"]
            jump = _lr_jump(training, old, new, start_step)
            raise RecipeError(
                f"max_steps {old} -> {new} re-plans the {schedule} learning-rate schedule from step {start_step}"
                f"{jump}; pass --resume_extend_schedule true to accept that, keep max_steps={old}, or use a "
                f"constant schedule"
            )
    for key, (old, new) in changes.items():
        logger.warning(
            "resume: %s changes from %s to %s (recorded in %s)", key, _show(old), _show(new), HISTORY_NAME
        )
    return changes


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _lr_jump(training, old_steps: int, new_steps: int, step: int) -> str:
    """`` (the learning rate goes from A to B)`` at ``step``, or empty if it cannot be computed."""
    try:
        from transformers import get_scheduler

        rates = []
        for total in (old_steps, new_steps):
            optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=training.learning_rate)
            scheduler = get_scheduler(
                training.lr_scheduler_type,
                optimizer,
                num_warmup_steps=training.get_warmup_steps(total),
                num_training_steps=total,
                scheduler_specific_kwargs=training.lr_scheduler_kwargs or {},
            )
            rates.append(training.learning_rate * scheduler.lr_lambdas[0](step))
    except Exception:  # noqa: BLE001 - only a detail of the message
        return ""
    return f" (the learning rate goes from {rates[0]:.3g} to {rates[1]:.3g})"


def _broadcast(value: str | None) -> str | None:
    """The main process's value on every process (identity without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
