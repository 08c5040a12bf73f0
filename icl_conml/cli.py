"""The ``icl_conml`` console script: one command, a subcommand per job.

    icl_conml train [RECIPE] [--key value ...]     # = python -m icl_conml.train
    icl_conml eval --model OUT --output_dir EVAL    # = python -m icl_conml.evaluation
    icl_conml compare --models A... --against B...  # = python -m icl_conml.evaluation compare
    icl_conml card | push FOLDER ...                # = python -m icl_conml.hub card | push
    icl_conml merge ADAPTER OUT                     # = python -m icl_conml.lora merge
    icl_conml make-eval-sets --tasks ...            # = python data_scripts/make_eval_sets.py
    icl_conml experiment SPEC                       # = python -m icl_conml.experiment
    icl_conml convert-garg STATE CONFIG OUT         # = python -m icl_conml.convert_garg
    icl_conml recipes list | path NAME | copy DEST  # = python -m icl_conml.resources

Each subcommand hands its arguments to the module's ``main(argv)``, so both spellings behave
identically, errors included (``icl_conml.errors``: one line, exit 2 for a user error, 3 for a
non-finite loss, 75 for a run stopped to be resumed, ``--traceback`` for the stack). Modules are
imported only when their subcommand runs: ``icl_conml --help`` stays fast.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import NamedTuple

from . import errors, help_cache


class Subcommand(NamedTuple):
    module: str  # whose main(argv) runs it
    prefix: tuple[str, ...]  # arguments put in front of the user's (the module's own subcommand)
    summary: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand("icl_conml.train", (), "train a model from a recipe ([RECIPE] [--key value ...])"),
    "eval": Subcommand("icl_conml.evaluation", (), "error against context length for a model and baselines"),
    "compare": Subcommand(
        "icl_conml.evaluation", ("compare",), "Table 5: models A against models B, paired by seed"
    ),
    "card": Subcommand("icl_conml.hub", ("card",), "(re)write a saved run's model card"),
    "push": Subcommand("icl_conml.hub", ("push",), "push a saved run to the Hugging Face Hub"),
    "merge": Subcommand("icl_conml.lora", ("merge",), "merge a LoRA run into a plain ICLModel"),
    "make-eval-sets": Subcommand("icl_conml.eval_sets", (), "write fixed evaluation prompt sets (datasets)"),
    "experiment": Subcommand("icl_conml.experiment", (), "run and analyse a paired multi-seed study"),
    "convert-garg": Subcommand("icl_conml.garg", (), "convert a Garg et al. checkpoint into an ICLModel"),
    "recipes": Subcommand("icl_conml.resources", (), "list, locate or copy the packaged recipes"),
}


def overview() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [
        f"usage: {errors.PROG} COMMAND [ARGS ...] [{errors.TRACEBACK_FLAG}]",
        "",
        "Meta-train transformers to learn in context, with the ConML objective.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.summary}" for name, command in SUBCOMMANDS.items()),
        "",
        f"'{errors.PROG} COMMAND --help' lists a command's options. Errors are one line (exit 2: a user",
        "error, 3: a non-finite loss, 74: a full disk, 75: a run stopped after a checkpoint, to resume;",
        f"130: Ctrl-C); {errors.TRACEBACK_FLAG} shows the stack instead.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``icl_conml COMMAND [ARGS ...]``: run COMMAND's module ``main`` with ARGS."""
    argv = list(sys.argv[1:] if argv is None else argv)
    leading = [arg for arg in argv[:1] if arg == errors.TRACEBACK_FLAG]  # icl_conml --traceback train ...
    argv = argv[len(leading) :]
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return 0 if argv else errors.EXIT_USAGE
    if argv[0] == "--version":
        from . import __version__

        print(f"{errors.PROG} {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    command = SUBCOMMANDS.get(name)
    if command is None:
        close = difflib.get_close_matches(name, list(SUBCOMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(
            f"{errors.PROG}: error: unknown command {name!r}{hint}; choose one of: {', '.join(SUBCOMMANDS)}",
            file=sys.stderr,
        )
        return errors.EXIT_USAGE
    if help_cache.print_cached_help():  # as the command printed it last time, without torch
        return 0
    errors.use_cli_names()
    module = importlib.import_module(command.module)
    return module.main([*command.prefix, *rest, *leading])


if __name__ == "__main__":
    sys.exit(main())
