"""Control of a study's training processes: one experiment command per run, and stop signals
forwarded to the training children.

- ``RunClaim``: an ``flock`` on ``output_dir/.experiment.lock`` for as long as an experiment command
  trains (or builds the record of) a run. Two experiment commands on one spec (or two specs
  sharing run folders) then never start the same run twice: the second one trains the other
  runs first and then waits for the claimed one, whose record it finds when the claim is
  released. A claim vanishes with its process (``kill -9`` leaves nothing to clean up).
- ``Children``: the live training processes. SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) to the
  experiment command are forwarded to each (SIGINT as SIGTERM: every child saves a checkpoint
  at its next step boundary and exits 75), no new run starts, and the command exits like
  training does: 75 after SIGTERM/SIGUSR1, 130 after Ctrl-C. A second Ctrl-C forwards SIGINT
  (the children stop at once, from their last checkpoint).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from ..errors import EXIT_CTRL_C, EXIT_INTERRUPTED
from ..runs.signals import SignalHandlers

CLAIM_NAME = ".experiment.lock"
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class RunClaim:
    """An exclusive, process-lifetime claim on one run folder (``try_acquire``/``wait``/``release``)."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / CLAIM_NAME
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the claim if nobody holds it (True), else False; never follows a symlink."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def wait(self, stop: threading.Event, poll_s: float = 1.0) -> bool:
        """Wait until the claim is free and take it (True), or until ``stop`` is set (False)."""
        while not stop.is_set():
            if self.try_acquire():
                return True
            stop.wait(poll_s)
        return False

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Children(SignalHandlers):
    """The live training processes of this command and the stop request that ends them."""

    handled_signals = FORWARDED

    def __init__(self) -> None:
        super().__init__()
        self.stop = threading.Event()
        self.signal: int | None = None
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen] = set()
        self._interrupts = 0

    # ---- signals (install/restore: SignalHandlers) ----
    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signal is None
        if first:
            self.signal = signum
            print(
                f"[experiment] {signal.Signals(signum).name} received: stopping the training runs (each saves "
                f"a checkpoint); re-run the command to resume",
                flush=True,
            )
        self.stop.set()
        if signum == signal.SIGINT:
            self._interrupts += 1
        # Ctrl-C asks each child to checkpoint and stop (SIGTERM); a second Ctrl-C stops them at once.
        forward = signal.SIGINT if self._interrupts > 1 else signal.SIGTERM
        if signum == signal.SIGUSR1 and first:
            forward = signal.SIGUSR1
        self._send(forward)

    def _send(self, signum: int) -> None:
        with self._lock:
            live = list(self._live)
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    @property
    def exit_code(self) -> int:
        """The command's exit status after a stop request: training's (75, or 130 for Ctrl-C)."""
        return EXIT_CTRL_C if self.signal == signal.SIGINT else EXIT_INTERRUPTED

    # ---- processes (any thread) ----
    def run(self, command: list[str], env: dict[str, str], log) -> int:
        """Run one training process to its end (its output to ``log``); returns its exit status.
        A process started while a stop is requested is sent the stop at once."""
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        with self._lock:
            self._live.add(process)
        if self.stop.is_set():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            return process.wait()
        finally:
            with self._lock:
                self._live.discard(process)
