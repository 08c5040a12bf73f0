"""A failed write to output_dir (disk full, quota, read-only filesystem, I/O error) as one line.

The disk filling up surfaces as ``OSError(ENOSPC)`` from Python writes, as safetensors'
``SafetensorError`` ("... (os error 28)"), or as torch's ``[enforce fail at inline_container.cc]
unexpected pos`` from ``torch.save``, which never says "no space"; ``storage_error`` recognises
each and explains it with the free space, the newest complete checkpoint and what to do
(``StorageError``: exit status ``EXIT_STORAGE``, 74); ``results_storage_error`` does the same
for the evaluation's results.
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

from ..errors import CommandError

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


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}
#: How Rust libraries (safetensors' ``SafetensorError``) spell an OS error in their message.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _failed_write(error: BaseException) -> str | None:
    """What failed if ``error`` is a failed write, else ``None``; ``""`` for torch's write failure,
    which never says why (``_describe`` tells from the free space)."""
    chain = _chain(error)
    texts = [str(e) for e in chain]
    errnos = {getattr(e, "errno", None) for e in chain}
    errnos |= {int(m) for t in texts for m in _RUST_OS_ERROR.findall(t)}
    torch_write = isinstance(error, RuntimeError) and any(
        m in t for t in texts for m in _TORCH_WRITE_FAILURES
    )
    if not (errnos & _STORAGE_ERRNOS or torch_write):
        return None
    if errno.EDQUOT in errnos:
        return "the disk quota is exceeded"
    if errno.ENOSPC in errnos:
        return "no space left on device"
    if errno.EROFS in errnos:
        return "the filesystem is read-only"
    if torch_write:
        return ""
    return f"a write failed ({texts[0].splitlines()[0][:120] if texts[0] else type(error).__name__})"


def _free_space(folder: str | Path) -> tuple[str, bool]:
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown", False
    return (
        f"{usage.free / 1e6:,.1f} MB free of {usage.total / 1e6:,.1f} MB",
        usage.free < max(64e6, 0.001 * usage.total),
    )


def _describe(error: BaseException, folder: str | Path) -> tuple[str, str] | None:
    what = _failed_write(error)
    if what is None:
        return None
    free, full = _free_space(folder)
    if not what:  # torch's write failure: no space if the disk is (nearly) full, else an I/O error
        what = "no space left on device" if full else f"a write failed ({str(error).splitlines()[0][:120]})"
    return what, free


def storage_error(error: BaseException, output_dir: str | Path, step: int | None) -> StorageError | None:
    """A ``StorageError`` explaining ``error`` if it is a failed write in any of the shapes the module
    docstring lists (else ``None``): what failed, the free space, the newest complete checkpoint and
    how to go on."""
    described = _describe(error, output_dir)
    if described is None:
        return None
    what, free = described
    from .checkpoints import latest_checkpoint

    last = latest_checkpoint(output_dir, verify=False)
    at = f" at step {step}" if step is not None else ""
    if last:
        kept, again = (
            f"the newest complete checkpoint is {last}",
            "resume with --resume_from_checkpoint latest",
        )
    else:  # auto starts over past checkpoints cut short by the full disk
        kept, again = "no checkpoint was saved", "start it again with --resume_from_checkpoint auto"
    return StorageError(
        f"{what} in output_dir={str(output_dir)!r} ({free}) while writing the run's files{at}; {kept}. "
        f"Free some space (or move output_dir), then {again}"
    )


def results_storage_error(error: BaseException, folder: str | Path) -> StorageError | None:
    """``storage_error`` for a command writing results (the evaluation): the same one line, exit 74."""
    described = _describe(error, folder)
    if described is None:
        return None
    what, free = described
    return StorageError(
        f"{what} in --output_dir {str(folder)!r} ({free}) while writing the results; no partial results file "
        f"was left. Free some space (or pass another --output_dir) and run the command again"
    )


def is_storage_failure(error: BaseException) -> bool:
    """Whether ``error`` is (or wraps) a failed write: an ``OSError``, torch's write failure, or a
    library error carrying an OS error code (safetensors)."""
    return _failed_write(error) is not None


def _chain(error: BaseException) -> list[BaseException]:
    found, cause = [], error
    while cause is not None and len(found) < 5:
        found.append(cause)
        cause = cause.__cause__ or cause.__context__
    return found
