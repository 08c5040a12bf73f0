"""The two command lines: ``python -m icl_conml.evaluation --model M --output_dir OUT [...]``
(one model against the reference estimators) and ``python -m icl_conml.evaluation compare
--models A1 [A2 …] --against B1 [B2 …] --output_dir OUT`` (Table 5). Arguments are the
dataclasses of ``arguments.py`` parsed by ``HfArgumentParser``. Errors follow
``icl_conml.errors``: one line on stderr, exit status 2 for a user error; ``--traceback`` (or a
bare ``--debug``) shows the stack."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser

from ..errors import OneLineParser, command_name, entry_point
from ..extras import is_available
from .arguments import (
    CompareArguments,
    ComparedModels,
    EvaluatedModel,
    EvaluationArguments,
    EvaluationError,
    OutputArguments,
    check_arguments,
)
from .compare import compare_models
from .curves import evaluate_model
from .report import comparison_table, results_table, write_comparison, write_results
from .setting import parse_task_kwargs


class EvaluationParser(HfArgumentParser, OneLineParser):
    """``HfArgumentParser`` with ``errors.OneLineParser``'s usage errors: one line on stderr (exit 2),
    like every other user error; ``--traceback`` listed in the help."""


def _finish(parser: EvaluationParser) -> EvaluationParser:
    """What dataclass fields cannot say: the device ``auto`` (resolved after parsing, so that the
    help is the same on every machine), ``--baselines`` with no value (= none)."""
    parser.set_defaults(device="auto")
    device_help = "Device of the model: auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:1, ..."
    parser._option_string_actions["--device"].help = device_help
    if "--baselines" in parser._option_string_actions:
        parser._option_string_actions["--baselines"].nargs = "*"
    if "--labels" in parser._option_string_actions:
        labels = parser._option_string_actions["--labels"]
        labels.nargs, labels.metavar = 2, ("LABEL_A", "LABEL_B")
    return parser


def build_parser() -> EvaluationParser:
    return _finish(
        EvaluationParser(
            [EvaluatedModel, EvaluationArguments, OutputArguments],
            prog=command_name("python -m icl_conml.evaluation", "icl_conml eval"),
            description="Error against the number of in-context examples, for a model and reference "
            "estimators. Use 'compare' as the first argument for the Table 5 comparison of two sets of models.",
        )
    )


def build_compare_parser() -> EvaluationParser:
    return _finish(
        EvaluationParser(
            [ComparedModels, CompareArguments, OutputArguments],
            prog=command_name("python -m icl_conml.evaluation compare", "icl_conml compare"),
            description="The paper's Table 5: models A_i against B_i (paired by seed) on identical prompts.",
        )
    )


def parse_args(parser: EvaluationParser, argv: list[str]) -> tuple[Any, ...]:
    """The parser's dataclasses, ``--device auto`` resolved; unknown arguments are a usage error,
    as with ``argparse``."""
    *outputs, remaining = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True, look_for_args_file=False
    )
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    outputs = outputs[: len(parser.dataclass_types)]  # (not the namespace of non-field options)
    for dataclass in outputs:
        if getattr(dataclass, "device", None) == "auto":
            dataclass.device = "cuda" if torch.cuda.is_available() else "cpu"
    return tuple(outputs)


def check_output_dir(output_dir: str) -> None:
    """The results folder exists (or is created) and takes a file: else one line, before any work."""
    import tempfile

    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise EvaluationError(
            f"--output_dir {output_dir!r} is a file, not a folder; pick a folder for the results"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".icl_conml-write-test-"):
            pass
    except OSError as error:
        raise EvaluationError(
            f"--output_dir {output_dir!r} is not writable ({error.strerror}); pick a writable folder"
        ) from None


@contextlib.contextmanager
def results_written(output_dir: str) -> Iterator[None]:
    """A full disk (or quota, read-only filesystem) while the results are written: one line, exit 74."""
    from ..runs.storage import is_storage_failure, results_storage_error

    try:
        yield
    except Exception as error:
        if is_storage_failure(error):
            raise results_storage_error(error, output_dir) from None
        raise


def _quiet_progress_bars() -> None:
    """The CLI shows its own bars (model forwards, estimators); weight-loading and dataset bars
    would clutter stderr."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _evaluate(selection: EvaluatedModel, args: EvaluationArguments, output: OutputArguments) -> None:
    results = evaluate_model(selection.model, args, progress=False if output.quiet else None)
    for note in results["metadata"]["notes"]:
        print(f"icl_conml: note: {note}", file=sys.stderr)
    with results_written(output.output_dir):
        out = write_results(results, output.output_dir, output.log_scale)
    print(results_table(results))
    print(f"wrote {out / 'results.json'}, results.md" + (", curves.png" * is_available("matplotlib")))


def _compare(selection: ComparedModels, args: CompareArguments, output: OutputArguments) -> None:
    result = compare_models(
        selection.models, selection.against, args, progress=False if output.quiet else None
    )
    with results_written(output.output_dir):
        out = write_comparison(result, output.output_dir, output.log_scale)
    print(comparison_table(result))
    print(f"wrote {out / 'compare.json'}, compare.md" + (", compare.png" * is_available("matplotlib")))


@entry_point(debug_alias=True)
def main(argv: list[str]) -> int:
    """``python -m icl_conml.evaluation [compare] ...`` (``icl_conml eval`` / ``icl_conml compare``)."""
    _quiet_progress_bars()
    comparing = bool(argv) and argv[0] == "compare"
    if comparing:
        selection, args, output = parse_args(build_compare_parser(), argv[1:])
    else:
        selection, args, output = parse_args(build_parser(), argv)
    args.task_kwargs = parse_task_kwargs(args.task_kwargs)  # before any model is loaded
    check_arguments(args)
    check_output_dir(output.output_dir)  # before the computation, not after it
    (_compare if comparing else _evaluate)(selection, args, output)
    return 0
