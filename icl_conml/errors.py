"""The one error convention of every ``icl_conml`` command (``icl_conml SUBCOMMAND`` and each
``python -m icl_conml.MODULE``).

A failure the user can fix is one line on stderr, ``icl_conml: error: MESSAGE``, with an exit
status that says what happened; ``--traceback`` (on every command; ``--debug`` is its old name
for ``train`` and ``eval``) shows the stack instead:

========  ======================================================================================
status    meaning
========  ======================================================================================
0         done
2         a user error: a bad recipe key or value, a missing file, a bad option (``UserError``)
3         training hit a non-finite loss (``callbacks.NonFiniteLossError``)
74        writing the run's files failed: disk full, quota, I/O error (``runs.storage.StorageError``)
75        a run stopped by SIGTERM/SIGUSR1 after saving a checkpoint: resume it (``runs.preemption``)
130       Ctrl-C
1         a failure nobody foresaw: a bug (Python's traceback is shown)
========  ======================================================================================

Every such error derives from ``CommandError``; ``run_main`` is the one place that turns them
into the line and the status. This module imports nothing else of the package up front
(``run_main`` imports the equally light ``help_cache`` when it runs), so every module can raise
these errors without an import circle.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

PROG = "icl_conml"
#: A user error: one line naming the problem and the fix.
EXIT_USAGE = 2
#: Training hit a NaN/inf loss or gradient.
EXIT_NON_FINITE = 3
#: A run stopped by SIGTERM/SIGUSR1 after saving a checkpoint (``EX_TEMPFAIL``, "try again").
EXIT_INTERRUPTED = 75
#: Ctrl-C (128 + SIGINT, the shell's convention).
EXIT_CTRL_C = 130
#: The flag that shows the stack instead of the one line (accepted by every command).
TRACEBACK_FLAG = "--traceback"
#: Its older name, kept for ``train`` and ``eval`` (only bare: ``--debug VALUE`` is TrainingArguments').
DEBUG_ALIAS = "--debug"


class CommandError(Exception):
    """An outcome reported as one line, ``icl_conml: {label}{message}``, with ``exit_code``."""

    exit_code: int = 1
    label: str = "error: "
    #: Whether ``--traceback`` shows the stack for it (a stop on request is not a failure).
    traceback_on_request: bool = True


class UserError(CommandError):
    """A user error (bad recipe, option, path): exit status 2, one line naming the fix.

    Each module's error (``RecipeError``, ``EvaluationError``, ``ExperimentError``, ...) derives
    from it, next to the built-in exception it always was (``ValueError``, ``ImportError``, ...).
    """

    exit_code = EXIT_USAGE


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit 2), like every other user error; it lists
    ``--traceback`` in its help (``run_main`` removes the flag before parsing)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.add_help:  # subparsers are built by the same class: each lists it
            self.add_argument(
                TRACEBACK_FLAG, action="store_true", default=argparse.SUPPRESS, help=TRACEBACK_HELP
            )

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}; run with --help for the options\n")


TRACEBACK_HELP = "On an error, show the Python stack instead of one line."

_names = {"cli": False}


def use_cli_names() -> None:
    """Called by the ``icl_conml`` console script: usage lines then show its spelling."""
    _names["cli"] = True


def command_name(module_form: str, cli_form: str) -> str:
    """The name a parser shows in its usage line: ``cli_form`` (``icl_conml eval``) under the
    ``icl_conml`` console script, else ``module_form`` (``python -m icl_conml.evaluation``)."""
    return cli_form if _names["cli"] else module_form


def split_traceback_flag(argv: list[str], debug_alias: bool = False) -> tuple[list[str], bool]:
    """``argv`` without ``--traceback`` (and a bare ``--debug`` when ``debug_alias``), and whether
    one was there. ``--debug VALUE`` / ``--debug=VALUE`` stay: that is ``TrainingArguments.debug``."""
    kept, show = [], False
    for i, arg in enumerate(argv):
        if arg == TRACEBACK_FLAG:
            show = True
            continue
        bare = i + 1 == len(argv) or argv[i + 1].startswith("-")
        if debug_alias and arg == DEBUG_ALIAS and bare:
            show = True
            continue
        kept.append(arg)
    return kept, show


def run_main(
    fn: Callable[[list[str]], int | None], argv: list[str] | None = None, *, debug_alias: bool = False
) -> int:
    """Run a command's ``fn(argv)`` under the convention; returns the exit status.

    ``argv`` defaults to ``sys.argv[1:]``; ``--traceback`` is removed before ``fn`` sees it.
    ``fn`` returns its status (``None`` = 0) or raises a ``CommandError``.
    """
    from .help_cache import recording  # imports nothing of the package up front either

    argv = list(sys.argv[1:] if argv is None else argv)
    argv, show_traceback = split_traceback_flag(argv, debug_alias)
    try:
        with recording():  # a bare --help's text is kept, to be printed without torch next time
            return fn(argv) or 0
    except CommandError as error:
        if show_traceback and error.traceback_on_request:
            raise
        print(f"{PROG}: {error.label}{error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        if show_traceback:
            raise
        print(f"{PROG}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_CTRL_C


def entry_point(fn: Callable[[list[str]], int | None] | None = None, *, debug_alias: bool = False):
    """Decorate a command's ``main(argv)`` so that it runs under ``run_main``: it then takes
    ``argv=None`` (``sys.argv[1:]``) and returns the exit status instead of raising."""

    def wrap(fn: Callable[[list[str]], int | None]) -> Callable[[list[str] | None], int]:
        @functools.wraps(fn)
        def main(argv: list[str] | None = None) -> int:
            return run_main(fn, argv, debug_alias=debug_alias)

        return main

    return wrap(fn) if fn is not None else wrap
