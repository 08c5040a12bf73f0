"""A failed write to output_dir (disk full, quota, read-only filesystem, I/O error) as one line.

The disk filling up surfaces as ``OSError(ENOSPC)`` from Python writes, or as torch's
``[enforce fail at inline_container.cc] unexpected pos`` from ``torch.save``, which never says
"no space"; ``storage_error`` recognises both and explains them with the free space, the newest
complete checkpoint and what to do (``StorageError``: exit status ``EXIT_STORAGE``, 74).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from .errors import CommandError

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
