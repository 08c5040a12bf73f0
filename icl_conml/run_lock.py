"""One run per output_dir: an exclusive lock on ``output_dir/.lock`` for the life of a run.

The main process holds ``fcntl.flock`` on ``output_dir/.lock`` for the whole run, with its pid,
host and start time written inside; a second run into the same folder is refused in one line
naming the holder. An flock vanishes with its process, so a lock left by a run that was killed
(``kill -9``, out of memory, a node crash) is *stale*: its record still says "held" but nobody
holds the flock. On the same host that proves the owner is gone; the new run takes the lock over
and says so in a warning naming the dead owner (refusing would make every requeue after a hard
kill need a human). An owner on another host may be alive on a filesystem whose locks do not
reach across hosts, so its record must also have stopped being refreshed (a heartbeat every
``HEARTBEAT_S``): the run waits until it is ``STALE_AFTER_S`` old, and refuses if the owner
refreshes it meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .arguments import RecipeError
from .run_record import now

logger = logging.getLogger("icl_conml")

LOCK_NAME = ".lock"
#: Seconds between refreshes of the lock file's time stamp by its holder.
HEARTBEAT_S = 20.0
#: A lock record of another host not refreshed for this long belongs to a dead run.
STALE_AFTER_S = 3 * HEARTBEAT_S


class OutputDirLock:
    """An exclusive lock on ``output_dir`` for the life of a run (see the module docstring):
    ``acquire`` (or a one-line ``RecipeError`` naming the holder), then ``release``."""

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
                {"state": "held", "pid": os.getpid(), "host": socket.gethostname(), "started": now()}
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
