"""Writing inside a run folder without ever following a symbolic link.

A run folder (``output_dir``) may come from someone else or be shared: a link planted at
``out/.lock`` or ``out/recipe.yaml`` would make a plain ``open(..., "w")`` truncate and rewrite
whatever it points at. The project's own writes go through this module: every open uses
``O_NOFOLLOW`` (a link at the path is an error, never followed), temporary files are created
with ``O_EXCL`` after removing whatever is at their path, and ``os.replace`` renames over a link
without following it. The Trainer's own writes (weights, ``trainer_state.json``, optimizer and
RNG states) cannot take flags, so ``refuse_links`` refuses a run folder holding a link where a
run writes before anything is trained.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path

from . import RunError

_CHECKPOINT = re.compile(r"checkpoint-\d+")


class LinkInRunFolder(RunError):
    """A write inside a run folder met a symbolic link (one line naming it; exit 2)."""


def _refuse(path: Path) -> LinkInRunFolder:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return LinkInRunFolder(
        f"{str(path)!r} is a symbolic link (to {target!r}); icl_conml never writes through a link in a "
        f"run folder: remove the link (or choose another output_dir)"
    )


def open_fd(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` with ``O_NOFOLLOW``: a link at ``path`` raises ``LinkInRunFolder``."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as error:
        if error.errno == errno.ELOOP or (error.errno == errno.EEXIST and os.path.islink(path)):
            raise _refuse(Path(path)) from None
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_bytes(path: str | Path, data: bytes, *, sync: bool = False) -> None:
    """Write ``path`` atomically (a new temporary file renamed over it): never a half-written file,
    never a write through a link (a link at ``path`` itself is replaced, its target untouched)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)  # removes a link itself, never its target
    fd = open_fd(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        try:
            _write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def write_text(path: str | Path, text: str, *, sync: bool = False) -> None:
    """``write_bytes`` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"), sync=sync)


def append_line(path: str | Path, line: str) -> None:
    """Append one line (and fsync): ``O_APPEND | O_NOFOLLOW``."""
    fd = open_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        _write_all(fd, (line.rstrip("\n") + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def overwrite_in_place(path: str | Path, data: bytes) -> None:
    """Rewrite an existing small file inside the blocks it already has (no new file, no rename).

    The last resort on a full disk, where ``write_bytes`` cannot create its temporary file: the
    file's old content is overwritten and cut to the new length. Not atomic (a kill in between
    leaves a mix): only for a final status whose alternative is a stale one.
    """
    fd = open_fd(path, os.O_WRONLY)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        _write_all(fd, data)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def links_in_run_folder(output_dir: str | Path) -> list[Path]:
    """The symbolic links directly in ``output_dir`` and anywhere inside its ``checkpoint-N`` folders
    (``output_dir`` itself may be a link: it is the user's own path)."""
    root = Path(output_dir)
    found: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    for entry in entries:
        if entry.is_symlink():
            found.append(Path(entry.path))
        elif _CHECKPOINT.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            for folder, dirs, files in os.walk(entry.path):  # os.walk never descends into a link
                found += [
                    Path(folder, name) for name in (*dirs, *files) if os.path.islink(Path(folder, name))
                ]
    return sorted(found)


def refuse_links(output_dir: str | Path) -> None:
    """Refuse (``LinkInRunFolder``, one line) a run folder that holds a link where a run writes:
    the Trainer writes its files without ``O_NOFOLLOW``, so this is checked before training."""
    links = links_in_run_folder(output_dir)
    if links:
        more = f" (and {len(links) - 1} more)" if len(links) > 1 else ""
        error = _refuse(links[0])
        raise LinkInRunFolder(str(error).replace("; icl_conml", f"{more}; icl_conml", 1))
