"""A run's own record in its output_dir: what it is doing now and what every segment did.

``run_status.json`` says what the run is doing now (running, interrupted, failed, finished;
rewritten atomically) and ``run_history.jsonl`` keeps one entry per event of each segment
(start: the resolved settings, the step it starts from, what changed since the previous
segment; trained: the training metrics before the final save; end: how it ended). Only the
main process writes; a resume reads the history back (``resume.check_resume``).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

from .files import LinkInRunFolder, append_line, overwrite_in_place, write_bytes

STATUS_NAME = "run_status.json"
HISTORY_NAME = "run_history.jsonl"


def now() -> str:
    """The local time with its UTC offset, to the second (how the record and the lock write times)."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


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
    """``run_status.json`` as a dict (empty if missing or unreadable)."""
    try:
        status = json.loads((Path(output_dir) / STATUS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def recorded_metrics(output_dir: str | Path, step: int) -> dict[str, Any]:
    """The training metrics an earlier segment recorded on reaching ``step`` (empty if none)."""
    for entry in reversed(read_history(output_dir)):
        if entry.get("event") in ("trained", "end") and entry.get("step") == step and entry.get("metrics"):
            return entry["metrics"]
    return {}


class RunRecord:
    """The status file and history entries of one run segment (written by the main process only)."""

    def __init__(self, output_dir: str | Path, main: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.main = main
        self.segment: int | None = None
        self.ended = False

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
            "time": now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_step": start_step,
            "resumed_from": resumed_from,
            **extra,
            "settings": settings,
        }
        self._append(entry)
        self._status("running", step=start_step)

    def trained(self, step: int | None, metrics: dict[str, Any]) -> None:
        """Record the training metrics before the final save (a kill during it keeps them)."""
        if self.main:
            self._append({"event": "trained", "segment": self.segment, "time": now(), "step": step,
                          "metrics": _finite(metrics)})  # fmt: skip

    def end(self, status: str, step: int | None, **details: Any) -> None:
        """Record how the segment ended: ``finished``, ``interrupted`` or ``failed``."""
        self.ended = True
        if not self.main or self.segment is None:
            return  # refused before it started: the folder's record stays as it was
        from .checkpoints import latest_checkpoint

        with contextlib.suppress(Exception):
            details.setdefault("last_checkpoint", latest_checkpoint(self.output_dir, verify=False))
        details = _finite(details)
        # The status first: on a full disk the history line may not fit, and a status left at
        # "running" would claim a live run (see _write_json's fallback).
        with contextlib.suppress(OSError, LinkInRunFolder):
            self._status(status, step=step, **details)
        with contextlib.suppress(OSError, LinkInRunFolder):
            self._append({"event": "end", "segment": self.segment, "time": now(), "status": status,
                          "step": step, **details})  # fmt: skip

    def _status(self, status: str, **details: Any) -> None:
        _write_json(self.output_dir / STATUS_NAME, {"status": status, **details, "time": now()})

    def _append(self, entry: dict[str, Any]) -> None:
        append_line(self.output_dir / HISTORY_NAME, json.dumps(entry, default=str))


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: keep non-finite numbers as strings."""
    return {
        key: value if not isinstance(value, float) or math.isfinite(value) else str(value)
        for key, value in metrics.items()
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a temporary file renamed over the old one): never a half-written file.

    On a full disk the temporary file cannot be written; the status is then rewritten inside the
    blocks the old one holds (a status is far below one block), so that a run that failed for want
    of space still says so, not "running".
    """
    data_bytes = (json.dumps(data, indent=1, default=str) + "\n").encode()
    try:
        write_bytes(path, data_bytes)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT) or not path.is_file():
            raise
        compact = (json.dumps(data, separators=(",", ":"), default=str) + "\n").encode()
        overwrite_in_place(path, compact)
