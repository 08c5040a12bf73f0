"""The evaluation's fresh prompts and ``--ood`` shifts: ``data.sample_prompts`` / ``data.parse_ood``
(``data.py`` owns every prompt), with their ``PromptError`` raised as this package's
``EvaluationError`` (same message, exit 2), as every module of the evaluation raises."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

from .. import data
from ..data import OOD_KINDS, OOD_VALUE_RANGE, OODShift, PromptError, Prompts
from .arguments import EvaluationError

__all__ = [
    "OOD_KINDS",
    "OOD_VALUE_RANGE",
    "OODShift",
    "Prompts",
    "error_scale",
    "parse_ood",
    "sample_prompts",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _evaluation_face(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """``function`` of ``data`` (its signature and docstring), raising ``EvaluationError`` where it
    raises ``PromptError``: callers of the evaluation catch one error type."""

    @wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return function(*args, **kwargs)
        except PromptError as error:
            raise EvaluationError(str(error)) from None

    return wrapper


parse_ood = _evaluation_face(data.parse_ood)
error_scale = _evaluation_face(data.ood_error_scale)
sample_prompts = _evaluation_face(data.sample_prompts)
