"""Reading an experiment spec: the file found by path or by packaged name, read with the recipe's
YAML hardening, every value type-checked, every path resolved against one folder, and every
arm's recipe checked by the training command's own parser, all before anything trains.

Every problem is one ``ExperimentError`` line naming the file (exit 2). The spec format is
documented in ``docs/experiments.md``.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..recipe_files import MAX_RECIPE_BYTES, _RecipeLoader, read_hardened_yaml
from .records import RUN_IDENTITY_KEYS, ExperimentError

DEFAULT_LAUNCHER = f"{sys.executable} -m icl_conml.train"

#: Arm and spec names become folder names: letters, digits, ``_ . -``, not starting with a dot.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
#: ``paths_relative_to`` values: the spec file's folder, or the project the spec ships in.
RELATIVE_TO = ("spec", "project")


class _SpecLoader(_RecipeLoader):
    """The recipe loader (no anchors or aliases: a few nested aliases expand to gigabytes; no key
    set twice: YAML keeps the last one, so a duplicate arm would silently replace another), with
    messages that speak of a spec."""

    documents = "specs"


def find_spec(name_or_path: str) -> Path:
    """A spec file: an existing path, else a packaged spec by name (``lr_paper_cpu``,
    ``lr_paper_cpu.yaml`` or ``experiments/lr_paper_cpu``) from any directory."""
    given = Path(name_or_path)
    if given.is_file():
        return given
    from ..resources import recipes_dir

    folder = recipes_dir() / "experiments"
    text = str(name_or_path).replace("\\", "/").removeprefix("recipes/").removeprefix("experiments/")
    for candidate in (text, f"{text}.yaml", f"{text}.yml"):
        if "/" not in candidate and (folder / candidate).is_file():
            return folder / candidate
    shipped = ", ".join(sorted(p.stem for p in folder.glob("*.yaml") if _is_study(p)))
    raise ExperimentError(
        f"experiment spec {str(name_or_path)!r} not found; pass the path of a spec YAML or the name of a "
        f"packaged spec ({shipped or 'none installed'})"
    )


def _is_study(path: Path) -> bool:
    """Whether a YAML file of recipes/experiments is a spec (not a base recipe such as cpu_base)."""
    try:
        return path.stat().st_size < MAX_RECIPE_BYTES and "\narms:" in f"\n{path.read_text()}"
    except (OSError, UnicodeDecodeError):
        return False


def read_spec_yaml(path: Path) -> dict[str, Any]:
    """The spec file's mapping, read as defensively as a recipe (size, text, anchors, duplicate keys)."""
    name = str(path)
    data = read_hardened_yaml(
        path,
        what="spec",
        error=ExperimentError,
        size_advice="a spec is a few dozen lines",
        loader=_SpecLoader,
    )
    if not isinstance(data, dict):
        raise ExperimentError(f"spec {name!r} must be a mapping (name, base_recipe, arms, seeds, ...)")
    return data


# ---- value types --------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> float | None:
    """A YAML number (1e-3 without a dot is a string in YAML 1.1), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _name_problem(what: str, value: Any) -> str | None:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        return (
            f"{what} {value!r} must be a folder name (letters, digits, _ . -, not starting with a dot): "
            f"it names the run folders and records"
        )
    return None


def check_values(data: dict[str, Any], path: Path) -> None:
    """Type-check a spec's top-level values (the dataclass does not): one line per problem."""

    def fail(message: str) -> None:
        raise ExperimentError(f"spec {path}: {message}")

    if problem := _name_problem("name", data["name"]):
        fail(problem)
    if not isinstance(data["base_recipe"], str) or not data["base_recipe"]:
        fail("base_recipe must be the path of a recipe YAML (or a packaged recipe's name)")
    arms = data["arms"]
    if not isinstance(arms, dict) or len(arms) < 2:
        fail("arms must map at least 2 arm names to key overrides")
    for arm, overrides in arms.items():
        if problem := _name_problem("arm name", arm):
            fail(problem)
        if not isinstance(overrides, dict) or any(not isinstance(key, str) for key in overrides):
            fail(f"arm {arm!r} must be a mapping of recipe keys to values ({{}} for none)")
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds:
        fail("seeds must be a non-empty list of distinct integers, e.g. [0, 1, 2]")
    odd = [seed for seed in seeds if not _is_int(seed) or seed < 0]
    if odd:
        fail(
            f"seed {odd[0]!r} is not a non-negative integer (a {type(odd[0]).__name__}); write seeds as "
            f"integers, e.g. [0, 1, 2]"
        )
    if len(set(seeds)) != len(seeds):
        fail(f"seeds {seeds} repeat a seed; each seed is one pair of runs")
    if not isinstance(data.get("overrides") or {}, dict):
        fail("overrides must be a mapping of recipe keys to values")
    for key in ("reference_arm", "control_arm"):
        value = data.get(key)
        if value is not None and value not in arms:
            fail(f"{key}={value!r} is not one of the arms {list(arms)}")
    for key in ("output_dir", "records_dir", "launcher", "gpu_hours"):
        if data.get(key) is not None and not isinstance(data[key], str):
            fail(f"{key} must be a string, got {type(data[key]).__name__}")
    if not isinstance(data.get("keep_weights", True), bool):
        fail("keep_weights must be true or false")
    if not isinstance(data.get("slurm") or {}, dict):
        fail("slurm must be a mapping of #SBATCH options")
    if data.get("paths_relative_to") not in (*RELATIVE_TO, None):
        fail(f"paths_relative_to={data['paths_relative_to']!r} must be one of {', '.join(RELATIVE_TO)}")


def check_eval(values: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``eval`` mapping with its types checked (numbers written as 1e-3 become floats)."""
    out = dict(values)

    def fail(message: str) -> None:
        raise ExperimentError(f"spec {path}: eval {message}")

    for key in ("n_prompts", "every", "bootstrap_samples"):
        if key in out and (not _is_int(out[key]) or out[key] < 1):
            fail(f"{key}={out[key]!r} must be an integer >= 1")
    if "seed" in out and (not _is_int(out["seed"]) or out["seed"] < 0):
        fail(f"seed={out['seed']!r} must be a non-negative integer")
    if "eval_set" in out and out["eval_set"] is not None and not isinstance(out["eval_set"], str):
        fail("eval_set must be the path of an eval set (or null)")
    if "thresholds" in out:
        thresholds = out["thresholds"]
        numbers = [_number(t) for t in thresholds] if isinstance(thresholds, list) else [None]
        if not numbers or any(n is None or not n > 0 for n in numbers):
            fail(f"thresholds={thresholds!r} must be a non-empty list of positive numbers")
        out["thresholds"] = numbers
    return out


# ---- paths --------------------------------------------------------------------------------------------
def path_base(spec_path: Path, relative_to: str) -> Path:
    """The folder every relative path of the spec is relative to.

    ``spec`` (the default): the spec file's folder. ``project``: the project the spec ships in, the
    folder that holds its ``recipes/`` folder (the repository root for the shipped specs in
    ``recipes/experiments/``); a spec installed inside the package has no project around it, so
    there it is the working directory (a study writes under the folder it is run from).
    """
    folder = Path(os.path.abspath(spec_path)).parent
    if relative_to == "spec":
        return folder
    for parent in (folder, *folder.parents):
        if parent.name == "recipes":
            root = parent.parent
            package = Path(__file__).resolve().parents[1]
            return Path.cwd() if root.resolve() == package else root
    raise ExperimentError(
        f"spec {spec_path}: paths_relative_to=project needs the spec inside a project's recipes/ folder; "
        f"use paths_relative_to=spec (paths relative to the spec's folder)"
    )


def resolve_path(base: Path, value: str) -> str:
    """``value`` relative to ``base`` (absolute stays absolute), shown relative to the working
    directory when inside it, so that commands and records read as they did when run from there."""
    joined = Path(os.path.normpath(os.path.join(base, os.path.expanduser(value))))
    try:
        return str(joined.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(joined)


def resolve_recipe(base: Path, value: str) -> str:
    """The base recipe: a file relative to ``base``, else a packaged recipe by name."""
    candidate = resolve_path(base, value)
    if Path(candidate).is_file():
        return candidate
    from ..resources import ResourceNotFound, resolve

    try:
        return resolve_path(Path.cwd(), str(resolve(value)))
    except ResourceNotFound:
        raise ExperimentError(
            f"base_recipe {value!r} not found: not {candidate!r} (paths in a spec are relative to "
            f"{base}) and not a packaged recipe name"
        ) from None


# ---- the spec and its runs ------------------------------------------------------------------------
@dataclass
class EvalSpec:
    """How every run is evaluated: the same prompts for all (``eval_set``, or sampled from ``seed``)."""

    n_prompts: int = 1000
    seed: int = 20261130
    eval_set: str | None = None
    every: int = 250
    thresholds: list[float] = field(default_factory=lambda: [0.1, 0.05])
    bootstrap_samples: int = 1000


@dataclass
class Spec:
    name: str
    base_recipe: str
    arms: dict[str, dict[str, Any]]
    seeds: list[int]
    overrides: dict[str, Any] = field(default_factory=dict)
    reference_arm: str | None = None
    eval: EvalSpec = field(default_factory=EvalSpec)
    output_dir: str | None = None
    records_dir: str | None = None
    launcher: str | None = None
    keep_weights: bool = True
    slurm: dict[str, Any] = field(default_factory=dict)
    gpu_hours: str | None = None
    control_arm: str | None = None
    paths_relative_to: str | None = None  # None: project inside a recipes/ folder, else spec
    path: Path | None = None

    @property
    def reference(self) -> str:
        return self.reference_arm or next(iter(self.arms))

    @property
    def out(self) -> Path:
        """The run folders' parent (``load_spec`` resolves ``output_dir``)."""
        return Path(self.output_dir or f"runs/experiments/{self.name}")

    @property
    def records(self) -> Path:
        return Path(self.records_dir) if self.records_dir else self.out / "records"

    @property
    def analysis(self) -> Path:
        """Where this spec's tables and plots go: a folder of its own, since specs may share records."""
        return self.records / self.name

    def runs(self) -> list[Run]:
        """Seed-major order, so that an interrupted study leaves complete pairs behind."""
        return [Run(self, arm, seed) for seed in self.seeds for arm in self.arms]


_SPEC_KEYS = {f for f in Spec.__dataclass_fields__ if f != "path"}
_EVAL_KEYS = set(EvalSpec.__dataclass_fields__)


def load_spec(path: str | Path, *, records_dir: str | None = None, output_dir: str | None = None) -> Spec:
    """Read and check a spec file (a path, or a packaged spec's name); every problem is one
    ``ExperimentError`` line. Relative paths in the spec are resolved against its
    ``paths_relative_to`` folder; ``records_dir``/``output_dir`` (the command's overrides)
    against the working directory. ``check_arms`` checks each arm's recipe."""
    path = find_spec(str(path))
    data = read_spec_yaml(path)
    unknown = set(data) - _SPEC_KEYS
    if unknown:
        raise ExperimentError(
            f"unknown spec key(s) {sorted(unknown)} in {path}; allowed: {sorted(_SPEC_KEYS)}"
        )
    for key in ("name", "base_recipe", "arms", "seeds"):
        if key not in data:
            raise ExperimentError(f"spec {path} lacks {key!r}")
    check_values(data, path)
    eval_data = data.pop("eval", None) or {}
    if not isinstance(eval_data, dict) or set(eval_data) - _EVAL_KEYS:
        raise ExperimentError(
            f"unknown eval key(s) {sorted(set(eval_data) - _EVAL_KEYS)} in {path}; allowed: {sorted(_EVAL_KEYS)}"
        )
    spec = Spec(**data, eval=EvalSpec(**check_eval(eval_data, path)), path=path)
    spec.overrides = spec.overrides or {}
    spec.slurm = spec.slurm or {}
    if spec.name in spec.arms:
        raise ExperimentError(
            f"spec {path}: name {spec.name!r} is also an arm's name; rename one (both are folders)"
        )
    if spec.control_arm is not None and spec.control_arm == spec.reference:
        raise ExperimentError(
            f"spec {path}: control_arm={spec.control_arm!r} is the reference arm; the control is another arm "
            f"that repeats the reference's settings (with init_perturbation_std)"
        )
    for key in RUN_IDENTITY_KEYS - {"run_name", "logging_dir"}:
        if key in spec.overrides or any(key in arm for arm in spec.arms.values()):
            raise ExperimentError(f"spec {path}: {key!r} is set by the experiment per run; remove it")
    if spec.paths_relative_to is None:  # a spec in a project's recipes/ folder is written for the project
        inside = any(parent.name == "recipes" for parent in Path(os.path.abspath(path)).parents)
        spec.paths_relative_to = "project" if inside else "spec"
    base = path_base(path, spec.paths_relative_to)
    spec.base_recipe = resolve_recipe(base, spec.base_recipe)
    if spec.eval.eval_set:  # a folder relative to the base, else a Hub id (REPO[:CONFIG]) as written
        local = resolve_path(base, spec.eval.eval_set)
        spec.eval.eval_set = local if Path(local).exists() else spec.eval.eval_set
    spec.output_dir = (
        resolve_path(Path.cwd(), output_dir)
        if output_dir is not None
        else resolve_path(base, spec.output_dir or f"runs/experiments/{spec.name}")
    )
    if records_dir is not None:
        spec.records_dir = resolve_path(Path.cwd(), records_dir)
        if output_dir is None:  # a study retrained from scratch: its own run folders, beside its records
            spec.output_dir = resolve_path(Path.cwd(), os.path.join(records_dir, "runs"))
    elif spec.records_dir is not None:
        spec.records_dir = resolve_path(base, spec.records_dir)
    folders = {spec.records / arm for arm in spec.arms} | {spec.analysis}
    if spec.out in folders or any(folder in spec.out.parents for folder in folders):
        raise ExperimentError(
            f"spec {path}: run folders {spec.out} would lie inside a records folder; give another output_dir"
        )
    return spec


def _flags(values: dict[str, Any]) -> list[str]:
    out = []
    for key, value in values.items():
        if isinstance(value, list):
            out += [f"--{key}", *map(str, value)]
        else:
            out += [f"--{key}", "null" if value is None else str(value)]
    return out


@dataclass
class Run:
    spec: Spec
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}"

    @property
    def output_dir(self) -> Path:
        return self.spec.out / self.arm / f"seed{self.seed}"

    @property
    def record_path(self) -> Path:
        return self.spec.records / self.arm / f"seed{self.seed}.json"

    def train_args(self) -> list[str]:
        ev = self.spec.eval
        args = [self.spec.base_recipe, *_flags(self.spec.overrides), *_flags(self.spec.arms[self.arm])]
        args += ["--seed", str(self.seed), "--output_dir", str(self.output_dir)]
        args += ["--eval_strategy", "steps", "--eval_steps", str(ev.every), "--disable_tqdm", "true"]
        if ev.eval_set:
            args += ["--eval_set", ev.eval_set]
        else:
            args += ["--eval_n_prompts", str(ev.n_prompts), "--eval_seed", str(ev.seed)]
        return args

    def command(self) -> list[str]:
        return [*shlex.split(self.spec.launcher or DEFAULT_LAUNCHER), *self.train_args()]

    def max_steps(self) -> int:
        """The training length this run asks for, as the training command will resolve it."""
        from ..recipe_parser import parse_recipe

        return parse_recipe(self.train_args()).training.max_steps
