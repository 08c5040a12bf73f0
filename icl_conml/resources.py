"""The recipes and accelerate configs that ship with the package, found by name or by path.

The repository's ``recipes/`` folder is the one copy: a wheel installs it as
``icl_conml/recipes/`` (``pyproject.toml`` maps the folder into the package), and a source
checkout or editable install reads it in place. So ``python -m icl_conml.train linear_regression``
works after ``pip install icl_conml`` as well as in the repository, where
``recipes/linear_regression.yaml`` keeps working as a path.

    python -m icl_conml.resources list            # every packaged recipe and accelerate config
    python -m icl_conml.resources path zero2      # the file a name resolves to
    python -m icl_conml.resources copy [DEST]     # copy them to DEST/recipes (default: ./recipes)

``copy`` is for the accelerate configs of DeepSpeed, which name their JSON file by a path
relative to the working directory (``recipes/accelerate/ds_zero2.json``): run from DEST, the
commands of the docs work as written.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .errors import OneLineParser, UserError, command_name, entry_point
from .help_cache import recipes_dir  # also keys the cached --help (train's defaults)

SUFFIXES = (".yaml", ".yml", ".json", ".slurm")


class ResourceNotFound(UserError, FileNotFoundError):
    """A recipe name or path that is neither a file nor a packaged recipe (one-line message, exit 2)."""


def available() -> list[str]:
    """Names of the packaged files (``linear_regression``, ``accelerate/zero2``, ...)."""
    root = recipes_dir()
    if not root.is_dir():
        return []
    names = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in SUFFIXES:
            relative = path.relative_to(root)
            name = str(relative.with_suffix("")) if path.suffix in (".yaml", ".yml") else str(relative)
            names.append(name)
    return names


def resolve(name_or_path: str | Path) -> Path:
    """A recipe or config file: an existing path, else a packaged file by name.

    ``linear_regression``, ``linear_regression.yaml``, ``recipes/linear_regression.yaml`` (from
    any directory), ``accelerate/zero2`` and ``zero2`` (an accelerate config) all resolve.
    """
    given = Path(name_or_path)
    if given.is_file():
        return given
    root = recipes_dir()
    text = str(name_or_path).replace("\\", "/")
    if text.startswith("recipes/"):
        text = text[len("recipes/") :]
    candidates = [text, *(text + suffix for suffix in SUFFIXES)]
    candidates += [f"accelerate/{candidate}" for candidate in candidates if "/" not in candidate]
    for candidate in candidates:
        path = root / candidate
        if path.is_file():
            return path
    names = ", ".join(name for name in available() if "/" not in name)
    raise ResourceNotFound(
        f"recipe {str(name_or_path)!r} not found: not a file, and not a packaged recipe name ({names}; "
        f"accelerate configs: python -m icl_conml.resources list)"
    )


def copy(destination: str | Path = ".") -> Path:
    """Copy the packaged recipes to ``destination/recipes`` (existing files are kept)."""
    target = Path(destination) / "recipes"
    shutil.copytree(recipes_dir(), target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@entry_point
def main(argv: list[str]) -> int:
    """``python -m icl_conml.resources list|path NAME|copy DEST`` (``icl_conml recipes``)."""
    parser = OneLineParser(
        prog=command_name("python -m icl_conml.resources", "icl_conml recipes"),
        description=__doc__.split("\n\n")[0],
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every packaged recipe and accelerate config")
    path_cmd = commands.add_parser("path", help="the file a recipe or config name resolves to")
    path_cmd.add_argument("name")
    copy_cmd = commands.add_parser("copy", help="copy the recipes to DEST/recipes")
    copy_cmd.add_argument("destination", nargs="?", default=".")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(available()))
    elif args.command == "path":
        print(resolve(args.name))
    else:
        print(f"copied the recipes to {copy(args.destination)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
