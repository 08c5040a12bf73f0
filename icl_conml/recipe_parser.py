"""The training command line: ``[RECIPE] [--key value ...]`` parsed into a ``Recipe``.

The parser is transformers' ``HfArgumentParser`` over the four argument sections (one
``--help`` section each, the recipe in the usage line): the recipe file's values become the
defaults and flags override them. Every problem argparse or ``TrainingArguments`` would report
as a usage dump or a traceback is one ``RecipeError`` line instead: an unknown option (with the
closest key), a bad value (naming the key and what it takes), a value outside a key's choices.
"""

from __future__ import annotations

import argparse
import enum
import re
import sys
import typing
from typing import Any, Literal

from transformers import HfArgumentParser

from .arguments import (
    SECTIONS,
    Recipe,
    RecipeError,
    check_choice,
    field_types,
    known_keys,
    plain_value,
    suggest_key,
    type_options,
)
from .recipe_files import load_yaml, recipe_path


def _enum_choices() -> dict[str, list[str]]:
    """Keys whose value must be one of fixed values, with the values: an Enum's (e.g.
    lr_scheduler_type) or a ``Literal``'s (e.g. conml_loss). Checked on the YAML and command-line
    values before parsing, so the error names the key and suggests the closest value."""
    from transformers.trainer_utils import SchedulerType  # ICLTrainingArguments types it as str

    choices = {"lr_scheduler_type": [str(member.value) for member in SchedulerType]}
    for key, hint in field_types().items():
        for option in type_options(hint):
            if isinstance(option, type) and issubclass(option, enum.Enum):
                choices[key] = [str(member.value) for member in option]
            elif typing.get_origin(option) is Literal:
                choices[key] = [str(value) for value in typing.get_args(option)]
    return choices


def _cli_values(argv: list[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs of the command line, keys with underscores."""
    values = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        key, equals, value = arg[2:].partition("=")
        if equals:
            values[key.replace("-", "_")] = value
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values[key.replace("-", "_")] = argv[i + 1]
    return values


class RecipeParser(HfArgumentParser):
    """``HfArgumentParser`` whose errors are one-line ``RecipeError``s instead of a usage dump."""

    def error(self, message: str):  # argparse calls this for bad values, missing values, ...
        raise RecipeError(_argparse_message(message))


def _argparse_message(message: str) -> str:
    match = re.match(r"argument --([\w-]+)(?:/\S+)?: (.*)", message)
    if not match:
        return f"{message}; run with --help to list every key"
    key, problem = match.group(1).replace("-", "_"), match.group(2)
    if found := re.match(r"invalid (\w+) value: (.*)", problem):
        kind = {"int": "an integer", "float": "a number"}.get(found.group(1), f"a {found.group(1)}")
        return f"{key}={found.group(2)} is not {kind}; pass {kind}"
    if found := re.match(r"invalid choice: (.*?) \(choose from (.*)\)", problem):
        return f"{key}={found.group(1)} is not allowed; choose one of: {found.group(2)}"
    if problem.startswith("expected one argument"):
        return f"--{key} needs a value: --{key} VALUE"
    if found := re.match(r"Truthy value expected: got (\S+)", problem):
        return f"{key}={found.group(1)!r} is not a boolean; pass true or false"
    return f"{key}: {problem}"


def build_parser() -> HfArgumentParser:
    """The training parser: one ``--help`` section per recipe section, the recipe in the usage line."""
    from .errors import TRACEBACK_FLAG, TRACEBACK_HELP, command_name

    prog = command_name("python -m icl_conml.train", "icl_conml train")
    parser = RecipeParser(
        SECTIONS,
        prog=prog,
        usage=f"{prog} [RECIPE] [--key value ...] [{TRACEBACK_FLAG}]",
        description="Meta-train an in-context learner (with ConML unless conml_lambda=0); the same command "
        "runs under `accelerate launch -m icl_conml.train` on any number of processes. RECIPE: a YAML file "
        "of key: value lines, or the name of a packaged recipe (python -m icl_conml.resources list); its "
        "keys are the options below, and --key value overrides one. Without a RECIPE: the quickstart "
        "(recipes/quickstart.yaml; its values are the defaults below).",
    )
    parser.add_argument(
        TRACEBACK_FLAG,
        action="store_true",
        default=argparse.SUPPRESS,  # removed before parsing (icl_conml.errors.run_main)
        help=f"{TRACEBACK_HELP} A bare --debug does the same (--debug VALUE is TrainingArguments.debug).",
    )
    _order_help(parser)
    return parser


def _order_help(parser: HfArgumentParser) -> None:
    """``--help`` shows the project's keys first: task, model, ConML, then the training keys the
    quickstart sets (``ICLTrainingArguments``' own fields), then every other ``TrainingArguments``
    option. Only the help's grouping changes; parsing is the same."""
    from .arguments import ICLTrainingArguments

    groups = {group.title: group for group in parser._action_groups}
    training = next(group for title, group in groups.items() if title.startswith("training"))
    own = set(ICLTrainingArguments.__annotations__)
    quickstart = parser.add_argument_group(
        "training (the keys the quickstart sets; every transformers.TrainingArguments key below works too)"
    )
    quickstart._group_actions[:] = [action for action in training._group_actions if action.dest in own]
    training._group_actions[:] = [action for action in training._group_actions if action.dest not in own]
    training.title = "other transformers.TrainingArguments options (defaults: transformers')"
    first = [groups[title] for title in ("task", "model", "ConML")]
    rest = [group for group in parser._action_groups if group not in (*first, quickstart, training)]
    parser._action_groups[:] = [*rest, *first, quickstart, training]


#: What ``python -m icl_conml.train`` runs without a recipe: ``recipes/quickstart.yaml``.
BUILT_IN_RECIPE = "quickstart"


def parse_recipe(argv: list[str] | None = None) -> Recipe:
    """``[RECIPE.yaml] [--key value ...]``: YAML values become defaults, flags override them; no
    RECIPE means the packaged quickstart (``BUILT_IN_RECIPE``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Without a recipe, the packaged quickstart: its values are the defaults that --help shows.
    raw = load_yaml(recipe_path(argv.pop(0) if argv and not argv[0].startswith("-") else BUILT_IN_RECIPE))
    parser = build_parser()
    parser.set_defaults(**raw)
    for i, arg in enumerate(argv):
        key = arg[2:].split("=")[0].replace("-", "_")
        if arg.startswith("--") and key not in known_keys() and arg not in ("--help", "-h"):
            raise RecipeError(f"unknown option --{key}{suggest_key(key)}")
        if not arg.startswith("-") and i == 0:
            raise RecipeError(f"unexpected argument {arg!r}; the recipe path must come first")
    given = {**raw, **_cli_values(argv)}
    for key, allowed in _enum_choices().items():
        if isinstance(given.get(key), str):  # TrainingArguments would say "not a valid X", not which key
            check_choice(key, given[key], allowed)
    try:
        model, task, conml_args, training = parser.parse_args_into_dataclasses(
            args=argv, look_for_args_file=False
        )
    except RecipeError:
        raise
    except ValueError as error:  # TrainingArguments' own checks
        message = str(error).strip().splitlines()[0]
        if message.startswith("Some specified arguments are not used"):
            unused = message.partition(": ")[2]
            message = f"unexpected argument(s) {unused}; options are --key value (run with --help to list every key)"
        raise RecipeError(message) from None
    # In command-line order (a set's order would change with PYTHONHASHSEED, and so would recipe.yaml's).
    overrides = dict.fromkeys(arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--"))
    raw.update({key: _value_of(key, (model, task, conml_args, training)) for key in overrides})
    return Recipe(model=model, task=task, conml=conml_args, training=training, raw=raw)


def _value_of(key: str, sections: tuple[Any, ...]) -> Any:
    """A section's value as plain YAML data (enums become their string value)."""
    for section in sections:
        if hasattr(section, key):
            return plain_value(getattr(section, key))
    return None
