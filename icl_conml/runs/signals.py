"""Signal handlers set for a while and then put back: the base of a run's stop signals
(``preemption.StopOnSignal``) and of the experiment command's forwarding to its training
processes (``experiment.processes.Children``)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class SignalHandlers:
    """``install`` points ``handled_signals`` at ``self._handle`` (from the main thread only: Python
    sets signal handlers nowhere else); ``restore`` puts the previous handlers back."""

    handled_signals: tuple[int, ...] = ()

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.handled_signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        raise NotImplementedError
