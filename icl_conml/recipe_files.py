"""Reading a recipe file: a packaged recipe by name, or a YAML file read defensively.

A recipe is a short mapping of ``key: value`` lines. ``load_yaml`` refuses, in one line naming
the file (``RecipeError``), whatever is not one or hides a mistake: a missing, binary, empty or
oversized file, YAML anchors and aliases, a key set twice, a value far larger than any key
takes, an unknown key (with the closest known one), or a value of the wrong type (YAML values
bypass argparse's conversions).
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

from .arguments import RecipeError, field_types, suggest_key, type_options
from .run_settings import short

#: A recipe is a few hundred bytes of ``key: value`` lines; these bounds only stop accidents.
MAX_RECIPE_BYTES = 1_000_000
MAX_VALUE_ITEMS = 1_000
MAX_VALUE_CHARS = 10_000


def recipe_path(name: str) -> Path:
    """A recipe's path, or a packaged recipe by name (``linear_regression``; see ``resources``)."""
    from .resources import ResourceNotFound, resolve

    try:
        return resolve(name)
    except ResourceNotFound:
        return Path(name)  # load_yaml reports it missing


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The recipe file's ``key: value`` mapping, each key known and each value of its key's type."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"recipe file {str(path)!r} not found; pass the path of a YAML recipe (see recipes/)"
        )
    data = read_hardened_yaml(
        path,
        what="recipe",
        error=RecipeError,
        size_advice="a recipe is a short list of key: value lines",
        not_text_advice="; pass a YAML recipe",
    )
    if data is None:
        raise RecipeError(
            f"recipe {str(path)!r} is empty; write key: value lines (see recipes/), or give no recipe to run the "
            f"quickstart"
        )
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a mapping of key: value, got {type(data).__name__}")
    for key, value in data.items():
        try:
            _check_size(str(key), value)
        except RecipeError as error:
            raise RecipeError(f"recipe {str(path)!r}: {error}") from None
    expected = field_types()
    for key, value in data.items():
        if key not in expected:
            raise RecipeError(f"unknown recipe key {key!r} in {path}{suggest_key(str(key))}")
        if key == "resume_from_checkpoint" and isinstance(value, bool):  # `resume_from_checkpoint: true`
            value = data[key] = "latest" if value else None
        if isinstance(value, str) and float in type_options(expected[key]):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                value = data[key] = float(value)
            except ValueError:
                pass
        _check_type(key, value, expected[key])
    return data


def read_hardened_yaml(
    path: Path,
    *,
    what: str,
    error: type[Exception],
    size_advice: str,
    not_text_advice: str = "",
    loader: type[yaml.SafeLoader] | None = None,
) -> Any:
    """Parse a YAML file a user hands us (a recipe, an experiment spec) defensively: a size cap, text
    only (UTF-8, no NUL), the hardened loader (no anchors or aliases, no key twice). Every problem is
    one ``error`` line naming the file as ``what``; ``size_advice`` and ``not_text_advice`` say what
    such a file should look like."""
    name = str(path)
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise error(
            f"{what} {name!r} is {size:,} bytes; {size_advice} (at most {MAX_RECIPE_BYTES:,} bytes): "
            f"is this the right file?"
        )
    raw = path.read_bytes()
    try:
        if b"\x00" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {name!r} is not a text file (UTF-8 YAML){not_text_advice}") from None
    try:
        return yaml.load(text, Loader=loader or _RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except _RecipeYAMLError as problem:
        raise error(f"{what} {name!r} {problem}") from None
    except yaml.YAMLError as problem:
        raise error(f"{what} {name!r} is not valid YAML: {str(problem).splitlines()[0]}") from None


class _RecipeYAMLError(Exception):
    """A recipe-specific YAML problem (line known), reported by ``load_yaml`` with the file name."""


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing what a recipe never needs and what hides mistakes: anchors and
    aliases (a few lines of nested aliases expand to gigabytes) and duplicate keys (YAML silently
    keeps the last one)."""

    #: What the messages call the files this loader reads.
    documents = "recipes"

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            kind = (
                f"alias *{event.anchor}" if isinstance(event, yaml.AliasEvent) else f"anchor &{event.anchor}"
            )
            raise _RecipeYAMLError(
                f"uses the YAML {kind} (line {event.start_mark.line + 1}); {self.documents} take no anchors or "
                f"aliases: write each value out"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _RecipeYAMLError(f"sets {key!r} twice (lines {seen[key]} and {line}); keep one")
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            seen[key] = line
        return super().construct_mapping(node, deep)


def _check_size(key: str, value: Any, depth: int = 0) -> None:
    """Refuse a value far larger than any recipe key takes (a list of a million modules...)."""
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        raise RecipeError(f"{key} is a string of {len(value):,} characters (at most {MAX_VALUE_CHARS:,})")
    if isinstance(value, (list, dict)):
        if len(value) > MAX_VALUE_ITEMS or depth > 4:
            what = (
                f"{len(value):,} items" if len(value) > MAX_VALUE_ITEMS else "values nested more than 4 deep"
            )
            raise RecipeError(
                f"{key} holds {what}; a recipe value is at most {MAX_VALUE_ITEMS:,} items, 4 deep"
            )
        for item in value.values() if isinstance(value, dict) else value:
            _check_size(key, item, depth + 1)


def _check_type(key: str, value: Any, expected: Any) -> None:
    """YAML values bypass argparse's type conversion: check simple scalar types here."""
    if value is None or expected is None:
        return
    options = tuple(typing.get_origin(o) or o for o in type_options(expected) if o is not type(None))
    if any(o is Any or not isinstance(o, type) for o in options):
        return
    ok = any(isinstance(value, o) and not (o is int and isinstance(value, bool)) for o in options)
    if float in options and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join(o.__name__ for o in options)
        raise RecipeError(f"{key}={short(value, 80)} has type {type(value).__name__}; expected {names}")
