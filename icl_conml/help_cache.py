"""A command's ``--help`` without importing torch: the text is cached once it has been rendered.

Rendering ``train --help`` needs transformers' ``TrainingArguments``, hence torch: 3–4 s on a
quiet machine, 15 s on a busy one, for a text that changes only with the installed code. So a
bare ``COMMAND [SUBCOMMAND] --help`` prints the text it printed last time when nothing it depends
on has changed (the exact command line, the package's files, Python, transformers, the terminal
width); otherwise the command renders it as before and it is stored for the next time.

The cache is a folder of plain text files under ``$XDG_CACHE_HOME/icl_conml/help`` (else
``~/.cache``); ``ICL_CONML_HELP_CACHE=0`` turns it off. A file that cannot be written is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

HELP_FLAGS = ("-h", "--help")
#: The words that may stand between a command and ``--help``: subcommands, never a file or a
#: value, on which the text could depend (``cli.SUBCOMMANDS`` and the modules' own; a test checks
#: that they are all here: one missing would only go uncached).
SUBCOMMAND_WORDS = frozenset(
    ("train", "eval", "compare", "card", "push", "merge", "make-eval-sets", "experiment")
    + ("convert-garg", "recipes", "list", "path", "copy")
)
#: Interpreter options that take the next word as their value.
_OPTIONS_WITH_VALUE = ("-X", "-W")
PACKAGE = Path(__file__).resolve().parent


def help_call() -> list[str] | None:
    """This process's command line (without the interpreter) if it is a bare help call of an
    ``icl_conml`` command (``python -m icl_conml.MODULE [SUB] --help``, ``icl_conml CMD --help``)."""
    words = sys.orig_argv[1:]  # Python >= 3.10
    i = 0
    while i < len(words) and words[i].startswith("-") and words[i] != "-m":
        i += 2 if words[i] in _OPTIONS_WITH_VALUE else 1
    if words[i : i + 1] == ["-m"]:
        command, rest = words[i + 1 : i + 2], words[i + 2 :]
        ours = bool(command) and command[0].split(".")[0] == "icl_conml"
    else:
        command, rest = words[i : i + 1], words[i + 1 :]
        ours = bool(command) and Path(command[0]).stem == "icl_conml"
    if not ours or not rest or rest[-1] not in HELP_FLAGS:
        return None
    return words if set(rest[:-1]) <= SUBCOMMAND_WORDS else None


def help_file() -> Path | None:
    """The cache file of this process's help text, or None when this is not a bare help call."""
    words = help_call()
    if words is None or os.environ.get("ICL_CONML_HELP_CACHE", "1") == "0":
        return None
    key = hashlib.sha256()
    for part in (*words, sys.version, _transformers_version(), str(shutil.get_terminal_size().columns)):
        key.update(part.encode() + b"\0")
    key.update(package_digest().encode())
    # The recipes too: without a recipe, train's --help shows the quickstart's values as defaults.
    # Installed, they are inside the package (digested above); a source checkout keeps them beside it.
    recipes = recipes_dir()
    if PACKAGE not in recipes.parents:
        key.update(package_digest(recipes).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "icl_conml" / "help"
    return cache / f"{key.hexdigest()[:32]}.txt"


def package_digest(root: Path = PACKAGE) -> str:
    """sha256 of the package's files (code, recipes, templates): any edit changes it."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def recipes_dir() -> Path:
    """The packaged recipes: ``icl_conml/recipes`` in a wheel, ``recipes/`` in a source checkout.
    ``resources.recipes_dir`` is this function: it lives here because this module may import
    nothing of the package (it runs before torch is imported, and ``errors`` imports it)."""
    installed = PACKAGE / "recipes"
    return installed if installed.is_dir() else PACKAGE.parent / "recipes"


def _transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return ""


def print_cached_help() -> bool:
    """Print this help call's cached text; False when there is none (the command renders it)."""
    path = help_file()
    if path is None or not path.is_file():
        return False
    sys.stdout.write(path.read_text(encoding="utf-8"))
    sys.stdout.flush()
    return True


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Around a command's parsing: what a help call prints (exit 0) is stored for the next time."""
    path = help_file()
    if path is None:
        yield
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    except SystemExit as stop:
        if stop.code in (0, None):
            _store(path, captured.getvalue())
        raise
    finally:
        sys.stdout.write(captured.getvalue())


def _store(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a new file renamed into place; give up quietly."""
    if not text:
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "x", encoding="utf-8") as handle:  # "x": never through a link
            handle.write(text)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
