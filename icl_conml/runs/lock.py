"""One run per output_dir: an exclusive lock on the folder for the life of a run.

The main process holds ``fcntl.flock`` on the folder itself (a descriptor of the directory: no
file a user can delete) and on ``output_dir/.lock``, with its pid, host and start time written
inside; a second run into the same folder is refused in one line naming the holder. Deleting
``.lock`` while a run holds the folder lets no second run in; the holder notices it at its next
check (``verify``: before the final save and at each checkpoint) and writes its record again.

An flock vanishes with its process, so a lock left by a run that was killed (``kill -9``, out
of memory, a node crash) is *stale*: its record still says "held" but nobody
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

from . import RunError
from .files import open_fd
from .record import now

logger = logging.getLogger("icl_conml")

LOCK_NAME = ".lock"
#: Seconds between refreshes of the lock file's time stamp by its holder.
HEARTBEAT_S = 20.0
#: A lock record of another host not refreshed for this long belongs to a dead run.
STALE_AFTER_S = 3 * HEARTBEAT_S


class OutputDirLock:
    """An exclusive lock on ``output_dir`` for the life of a run (see the module docstring):
    ``acquire`` (or a one-line ``RunError`` naming the holder), then ``release``."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._fd: int | None = None
        self._dir_fd: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``RunError`` (one line) naming who holds it."""
        self._lock_folder()
        try:
            fd = open_fd(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as error:
            self._unlock_folder()
            raise RunError(
                f"output_dir={str(self.output_dir)!r} is not writable ({error.strerror}): cannot create "
                f"{LOCK_NAME} there; pick a writable folder"
            ) from None
        except BaseException:
            self._unlock_folder()
            raise
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
            self._unlock_folder()
            raise
        self._heartbeat = threading.Thread(target=self._beat, name="icl_conml-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _lock_folder(self) -> None:
        """flock a descriptor of the folder itself: deleting or replacing ``.lock`` cannot free it.

        Where the filesystem cannot lock a directory (some network filesystems), ``.lock`` alone
        decides, as before, and ``verify`` refuses to go on if ``.lock`` stops being this run's.
        """
        try:
            fd = os.open(self.output_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return  # not there or not readable: creating .lock reports it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self._read_path()
            raise self._in_use(
                _describe(holder) if holder else f"its {LOCK_NAME} record was deleted"
            ) from None
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF):
                raise
            return
        self._dir_fd = fd

    def _unlock_folder(self) -> None:
        if self._dir_fd is not None:
            _unlock(self._dir_fd)
            self._dir_fd = None

    def _in_use(self, holder: str) -> RunError:
        """The one-line refusal of a folder another run holds (``holder``: who, as far as known)."""
        return RunError(
            f"output_dir={str(self.output_dir)!r} is in use by another run ({holder}); "
            f"wait for it to end, stop it, or choose another output_dir"
        )

    def _read_path(self) -> dict[str, Any]:
        """The record at ``.lock`` read without following a link (empty if none)."""
        try:
            fd = open_fd(self.path, os.O_RDONLY)
        except OSError:
            return {}
        try:
            return self._read(fd)
        finally:
            os.close(fd)

    def verify(self) -> None:
        """Check that ``.lock`` is still this run's record (same file, not deleted or replaced).

        Holding the folder's own lock, the run simply writes its record again (with a warning);
        without it (a filesystem that cannot lock folders) another run may have taken the folder,
        so this raises ``RunError`` before anything is deleted or saved.
        """
        if self._fd is None:
            return
        try:
            same = os.lstat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return
        if self._dir_fd is None:
            raise RunError(
                f"output_dir={str(self.output_dir)!r}: its {LOCK_NAME} was deleted or replaced while this run "
                f"held it and this filesystem cannot lock the folder itself, so another run may be writing "
                f"there; stopping before anything is deleted or saved: make sure only one run uses the folder, "
                f"then resume with --resume_from_checkpoint latest"
            )
        logger.warning(
            "output_dir=%r: its %s was deleted or replaced while this run holds the folder; writing it again "
            "(no other run can take the folder meanwhile: the lock is on the folder itself)",
            str(self.output_dir),
            LOCK_NAME,
        )
        record = self._read(self._fd)
        _unlock(self._fd)
        self._fd = None
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            if os.path.islink(self.path) or os.path.isfile(self.path):
                os.unlink(self.path)
        self._fd = open_fd(self.path, os.O_RDWR | os.O_CREAT)
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._write_record(record)

    def _flock(self, fd: int) -> bool:
        """flock the file; False where the filesystem does not support flock (then the record decides)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use(_describe(self._read(fd))) from None
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
        if previous.get("host") == socket.gethostname():
            pid = int(previous.get("pid") or 0)
            if not flock_works and pid and pid != os.getpid() and _pid_alive(pid):
                raise self._in_use(_describe(previous))
        else:
            self._wait_until_stale(previous)
        logger.warning(
            "output_dir=%r: taking over the lock of a run that ended without releasing it (%s; killed or "
            "crashed). Resume its work with --resume_from_checkpoint latest, or start over with "
            "--overwrite_output_dir true",
            str(self.output_dir),
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
                raise RunError(
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
            with contextlib.suppress(OSError, TypeError):
                os.utime(self._fd)  # the file this run holds, never through a link at the path

    def release(self) -> None:
        """Mark the record released and drop the flock (the file stays: deleting it races)."""
        if self._fd is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            self._write_record({"state": "released", "pid": os.getpid(), "host": socket.gethostname()})
        _unlock(self._fd)
        self._fd = None
        self._unlock_folder()


def _unlock(fd: int) -> None:
    """Drop the flock on ``fd`` (if the filesystem took one) and close it."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


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
