"""Named extension points: function classes, ConML views, distances and representations, and
the evaluation's reference estimators, each a ``Registry``.

An object is named in a recipe or on the command line either by its registered name
(``conml_views: prefix_half``) or by import path (``conml_views: my_module:every_other``). An
import path is imported only when the caller allows it (``allow_import=True``: a recipe or a
command line the user runs is their own code; a name read from a file, such as a model's
``config.json``, an eval set or an experiment record, is imported only with
``trust_remote_code``). Either way the object must be of the registry's kind (checked without
calling it) before anyone uses it. A path once resolved, and the path of every registered
object, resolves again without importing anything.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class RemoteCodeError(UserError, ValueError):
    """An import path read from a file (a model's config.json, an eval set, an experiment record)
    that nobody allowed: importing it would run code shipped with that file (one line, exit 2)."""


def import_path(obj: Any) -> str:
    """``module:qualname`` of a class or function: how another process names it."""
    return f"{obj.__module__}:{obj.__qualname__}"


class Registry(Generic[T]):
    """Objects of one kind by name, with their options (e.g. a view's ``prefix``).

    ``kind`` names the registry in messages (``"task"``, ``"conml_views"``, ...); ``is_kind`` says,
    without calling the object, whether it is one (a ``FunctionClass`` subclass, a callable
    taking the right arguments); ``expected`` says what that is, for the error ("a ...").
    """

    def __init__(self, kind: str, is_kind: Callable[[Any], bool], expected: str) -> None:
        self.kind = kind
        self.expected = expected
        self._is_kind = is_kind
        self._entries: dict[str, T] = {}
        self._options: dict[str, dict[str, Any]] = {}
        self._paths: dict[str, T] = {}  # import path -> object: registered ones, and ones resolved

    # ---- registering -----------------------------------------------------------------------
    def add(self, name: str, obj: T, **options: Any) -> T:
        """Register ``obj`` as ``name``; a name already taken by another object is refused (the
        same object, or the same class or function re-imported, replaces it)."""
        self._check_kind(obj, repr(name))
        held = self._entries.get(name)
        if held is not None and held is not obj and import_path(held) != import_path(obj):
            raise ValueError(f"{self.kind} name {name!r} is already registered for {import_path(held)}")
        self._entries[name] = obj
        self._options[name] = options
        self._paths[import_path(obj)] = obj
        return obj

    def register(self, name: str, **options: Any) -> Callable[[T], T]:
        """Decorator form of ``add``."""
        return functools.partial(self.add, name, **options)

    def remove(self, name: str) -> None:
        """Forget ``name`` (and its import path): for tests that register something temporarily."""
        obj = self._entries.pop(name, None)
        self._options.pop(name, None)
        if obj is not None:
            self._paths.pop(import_path(obj), None)

    # ---- looking up --------------------------------------------------------------------------
    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order (for errors and ``--help``)."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())

    def options(self, name: str) -> dict[str, Any]:
        """What ``name`` was registered with (the registered object's, for its import path; ``{}``
        for an unregistered one)."""
        if name in self._options:
            return self._options[name]
        obj = self._paths.get(name)
        return next((self._options[key] for key, held in self._entries.items() if held is obj), {})

    def resolve(self, name: str, *, allow_import: bool) -> T:
        """The object ``name`` gives: a registered name, or ``package.module:attribute``.

        An import path not yet known to this process is imported only with ``allow_import``
        (else ``RemoteCodeError``, before any import); the attribute must be of this registry's
        kind before it is returned. Other errors are one-line ``ValueError``s, an unknown name's
        naming the closest registered one.
        """
        if name in self._entries:
            return self._entries[name]
        if name in self._paths:
            return self._paths[name]
        module_name, colon, attribute = str(name).partition(":")
        if not colon:
            close = difflib.get_close_matches(str(name), list(self._entries), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}{hint}; choose one of: {', '.join(self._entries)}, "
                f"or name your own as 'package.module:name'"
            )
        if not allow_import:
            raise RemoteCodeError(
                f"{self.kind} {name!r} is an import path read from a file (a model's config.json, an eval "
                f"set or a record): importing it would run code that came with that file; pass "
                f"trust_remote_code=True (--trust_remote_code) if you trust it, or use a registered "
                f"{self.kind} ({', '.join(self._entries)})"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(
                f"{self.kind} {name!r}: cannot import {module_name!r} ({error}); is it on PYTHONPATH?"
            ) from None
        obj = module
        for part in attribute.split("."):
            obj = getattr(obj, part, None)
        self._check_kind(obj, repr(name), f"{module_name}.{attribute} is not {self.expected}")
        self._paths[name] = obj
        return obj

    def _check_kind(self, obj: Any, label: str, problem: str | None = None) -> None:
        if not self._is_kind(obj):
            raise ValueError(f"{self.kind} {label}: {problem or f'{obj!r} is not {self.expected}'}")


def takes_positional(count: int) -> Callable[[Any], bool]:
    """``is_kind`` for functions: a callable (not a class) that accepts ``count`` positional
    arguments, judged from its signature (nothing is called)."""
    import inspect

    def check(obj: Any) -> bool:
        if not callable(obj) or isinstance(obj, type):
            return False
        try:
            inspect.signature(obj).bind(*range(count))
        except (TypeError, ValueError):
            return False
        return True

    return check
