"""Fixed evaluation prompt sets as ``datasets.Dataset``, with a dataset card; loaded from a
folder or the Hub (the HF cache when offline).

``data_scripts/make_eval_sets.py`` is the command line of this module. A set is one folder
``OUTPUT_DIR/<task>_d<d>_n<n>_s<seed>[_<ood>]`` (``save_to_disk``) plus its card
(``README.md``: task, hyper-parameters, d, points, prompts, seed, how it was made and the
command), one row per prompt: ``xs`` (n × d), ``ys`` (n), the metadata columns ``task``,
``task_kwargs`` (JSON), ``n_dims``, ``n_points``, ``seed``, ``ood`` (and ``query_xs`` /
``query_ys`` for the shifts whose query is not the next input). On the Hub a set is the
``test`` split of config ``<name>`` of a dataset repository, described by a section of the
repository's card.

A task's hyper-parameters default to the function class's own (its dataclass fields, as in a
training recipe): whatever fields a class has are recorded, so a new function class needs no
change here.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .data import sample_prompts
from .errors import OneLineParser, UserError, command_name, entry_point
from .tasks import TASKS, FunctionClass, get_task, hyperparameter_names, resolve_task_class

if TYPE_CHECKING:
    import datasets

COLUMNS = ("xs", "ys", "task", "n_dims", "n_points")
CARD_TAGS = ["in-context-learning", "icl_conml", "synthetic"]


class EvalSetError(UserError, ValueError):
    """A user error in building or loading an eval set (one line, exit 2)."""


# ---- building ---------------------------------------------------------------------------------------
def task_hyperparameters(task: FunctionClass) -> dict[str, Any]:
    """A function class's hyper-parameters: its dataclass fields other than ``n_dims``."""
    return {name: getattr(task, name) for name in hyperparameter_names(type(task))}


def hyperparameter_fields() -> dict[str, type]:
    """Every hyper-parameter of a registered function class, with its type (for command-line flags)."""
    found: dict[str, type] = {}
    for _, cls in TASKS.items():
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                if f.init and f.name != "n_dims" and f.default is not dataclasses.MISSING:
                    found.setdefault(f.name, type(f.default))
    return found


def task_class(task_name: str) -> type[FunctionClass]:
    """The class a registry name or an import path (``package.module:ClassName``: the user's own
    command names it, so it is imported) gives; else one line."""
    try:
        return resolve_task_class(task_name, allow_import=True)
    except ValueError as error:
        raise EvalSetError(str(error).splitlines()[0]) from None


def resolve_task(task_name: str, n_dims: int, **overrides: Any) -> FunctionClass:
    """The function class with ``overrides`` for the hyper-parameters it has (others are ignored:
    one command can serve several tasks) and its own defaults for the rest, as a recipe builds it."""
    cls = task_class(task_name)
    accepted = set(hyperparameter_names(cls))
    try:
        return get_task(
            task_name, n_dims, **{key: value for key, value in overrides.items() if key in accepted}
        )
    except (ValueError, TypeError) as error:
        raise EvalSetError(str(error).splitlines()[0]) from None


def set_name(task: str, n_dims: int, n_points: int, seed: int, ood: str | None) -> str:
    """The set's folder and Hub config name (an import path's ``:`` becomes ``-``)."""
    name = f"{task.replace(':', '-')}_d{n_dims}_n{n_points}_s{seed}"
    return name + (f"_{ood.replace('=', '')}" if ood else "")


def build_eval_set(
    task_name: str,
    n_dims: int,
    n_points: int,
    n_prompts: int,
    seed: int,
    ood: str | None = None,
    **task_kwargs: Any,
) -> datasets.Dataset:
    """The prompts ``data.sample_prompts`` (the evaluation's fresh prompts) draws for these
    settings, with metadata columns.

    ``task_kwargs`` that the task does not take are ignored (one call can serve several tasks).
    """
    import datasets

    task = resolve_task(task_name, n_dims, **task_kwargs)
    prompts = sample_prompts(task, n_prompts, n_points, seed, ood)
    count, length = prompts.xs.shape[:2]
    columns = {
        "xs": prompts.xs.numpy(),
        "ys": prompts.ys.numpy(),
        "task": [task_name] * count,
        "task_kwargs": [json.dumps(task_hyperparameters(task))] * count,
        "n_dims": [n_dims] * count,
        "n_points": [length] * count,
        "seed": [seed] * count,
        "ood": [ood or ""] * count,
    }
    features = {
        "xs": datasets.Array2D((length, n_dims), "float32"),
        "ys": datasets.Sequence(datasets.Value("float32"), length=length),
        "task": datasets.Value("string"),
        "task_kwargs": datasets.Value("string"),
        "n_dims": datasets.Value("int32"),
        "n_points": datasets.Value("int32"),
        "seed": datasets.Value("int64"),
        "ood": datasets.Value("string"),
    }
    if prompts.queries is not None:
        columns["query_xs"] = prompts.queries.numpy()
        columns["query_ys"] = prompts.query_ys.numpy()
        features["query_xs"] = datasets.Array2D((length, n_dims), "float32")
        features["query_ys"] = datasets.Sequence(datasets.Value("float32"), length=length)
    metadata = {"task": task_name, "task_kwargs": task_hyperparameters(task), "n_dims": n_dims,
                "n_points": length, "seed": seed, "ood": ood, "n_prompts": count}  # fmt: skip
    tensors = {name: columns[name] for name in PROMPT_COLUMNS if name in columns}
    columns["fingerprint"] = [fingerprint(tensors, metadata)] * count
    features["fingerprint"] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


PROMPT_COLUMNS = ("xs", "ys", "query_xs", "query_ys")
METADATA_COLUMNS = ("task", "task_kwargs", "n_dims", "n_points", "seed", "ood")


def fingerprint(tensors: dict[str, Any], metadata: dict[str, Any]) -> str:
    """sha256 of a set's prompts (float32 bytes) and metadata: stored in its ``fingerprint`` column
    when it is made, recomputed when it is loaded, so an edited prompt or metadata value (another
    task, dimension, noise level, seed...) is detected instead of evaluated under a wrong label."""
    import hashlib

    import numpy as np

    described = {
        "task": metadata["task"],
        "task_kwargs": metadata["task_kwargs"],
        "n_dims": int(metadata["n_dims"]),
        "n_points": int(metadata["n_points"]),
        "seed": None if metadata.get("seed") is None else int(metadata["seed"]),
        "ood": metadata.get("ood") or None,
        "n_prompts": int(metadata["n_prompts"]),
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    for name in PROMPT_COLUMNS:
        if name in tensors:
            values = tensors[name]
            values = values.numpy() if hasattr(values, "numpy") else values
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(values, dtype="<f4").tobytes())
    return digest.hexdigest()


# ---- the dataset card ------------------------------------------------------------------------------------
def describe(dataset: datasets.Dataset) -> dict[str, Any]:
    """The set's settings, read from its first row."""
    row = dataset[0]
    return {
        "task": row["task"],
        "task_kwargs": json.loads(row.get("task_kwargs") or "{}"),
        "n_dims": int(row["n_dims"]),
        "n_points": int(row["n_points"]),
        "n_prompts": len(dataset),
        "seed": int(row["seed"]) if "seed" in row else None,
        "ood": row.get("ood") or None,
    }


def card_section(name: str, dataset: datasets.Dataset, command: str | None = None) -> str:
    """Markdown describing one set: what it holds, how it was made, how to use it."""
    info = describe(dataset)
    kwargs = ", ".join(f"{k}={v}" for k, v in info["task_kwargs"].items()) or "none"
    shifted = "query_xs" in dataset.column_names
    lines = [
        f"## {name}",
        "",
        "| setting | value |",
        "|---|---|",
        f"| task (function class) | `{info['task']}` |",
        f"| task hyper-parameters | {kwargs} |",
        f"| input dimension d | {info['n_dims']} |",
        f"| points per prompt | {info['n_points']} |",
        f"| prompts | {info['n_prompts']} |",
        f"| seed | {info['seed']} |",
        f"| distribution shift | {info['ood'] or 'none (x ~ N(0, I_d))'} |",
        f"| icl_conml version | {__version__} |",
        "",
        "How it was made: `icl_conml.evaluation.sample_prompts(task, n_prompts, n_points, seed, ood)`, the "
        "prompts the evaluation CLI draws for `--seed` (one function per prompt, then its inputs and labels "
        "from a `torch.Generator` seeded by (seed, 0, evaluation stream)); rebuilding with the same command "
        "gives the same prompts.",
        "",
        "Columns: `xs` (n × d inputs), `ys` (n labels)"
        + (
            ", `query_xs` / `query_ys` (the k-th query and its label, when the query is not x_k)"
            if shifted
            else ""
        )
        + ", and the metadata columns `task`, `task_kwargs` (JSON), `n_dims`, `n_points`, `seed`, `ood`.",
    ]
    if command:
        lines += ["", "Command:", "", "```bash", command, "```"]
    return "\n".join(lines) + "\n"


def build_card(name: str, dataset: datasets.Dataset, command: str | None = None, existing=None):
    """A ``huggingface_hub.DatasetCard``: ``existing`` (a repository's card) with this set's section
    added or replaced, or a new card for a folder."""
    from huggingface_hub import DatasetCard, DatasetCardData

    section = card_section(name, dataset, command)
    if existing is None:
        data = DatasetCardData(tags=CARD_TAGS, license="apache-2.0", pretty_name=f"icl_conml eval set {name}")
        return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{_intro()}\n{section}")
    text, header = existing.text, f"## {name}\n"
    if header in text:  # replace this set's section, keep the others
        start = text.index(header)
        following = text.find("\n## ", start + len(header))
        text = text[:start] + section + (text[following + 1 :] if following != -1 else "")
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else _intro() + "\n") + section
    existing.text = text
    for tag in CARD_TAGS:
        if tag not in (existing.data.tags or []):
            existing.data.tags = [*(existing.data.tags or []), tag]
    return existing


def _intro() -> str:
    return (
        "# In-context learning evaluation prompts (icl_conml)\n\n"
        "Fixed prompt sets of (x, y) pairs for evaluating in-context learners on identical prompts "
        "(Garg et al. 2022 function classes), made with icl_conml's `data_scripts/make_eval_sets.py`. "
        "Evaluate a model on one with\n\n"
        "```bash\npython -m icl_conml.evaluation --model MODEL --output_dir OUT --eval_set REPO_OR_FOLDER[:CONFIG]\n```\n\n"
        "or set `eval_set:` in a training recipe to evaluate on it during training.\n"
    )


# ---- loading ---------------------------------------------------------------------------------------------
def load(name: str) -> datasets.Dataset:
    """An eval set: a ``save_to_disk`` folder, a folder of parquet files, or ``REPO[:CONFIG]``
    on the Hub. Offline (``HF_HUB_OFFLINE=1``) a Hub set loads from the HF cache, where
    ``datasets.load_dataset`` alone would need its own prepared cache."""
    import datasets

    path = Path(name)
    if path.exists():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded["test"] if "test" in loaded else next(iter(loaded.values()))
            return loaded
        return _from_parquet(sorted(path.rglob("*.parquet")), name)
    repo, _, config = name.partition(":")
    try:
        return datasets.load_dataset(repo, config or None, split="test")
    except Exception as error:  # offline, or a repository datasets cannot read: the HF hub cache
        try:
            return _from_hub_files(repo, config)
        except EvalSetError:
            raise
        except Exception:
            raise error from None


def _from_hub_files(repo: str, config: str) -> datasets.Dataset:
    """The parquet files of ``config``'s test split from the repository snapshot (or the HF cache)."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo, repo_type="dataset", allow_patterns=["*.parquet", "**/*.parquet"]))
    configs = sorted({p.parent.name for p in folder.rglob("test-*.parquet")})
    chosen = config or ("data" if "data" in configs else configs[0] if len(configs) == 1 else None)
    if chosen is None or chosen not in configs:
        raise EvalSetError(
            f"{repo} has no eval set {config!r}; give one of its configs as {repo}:CONFIG ({', '.join(configs)})"
        )
    return _from_parquet(sorted((folder / chosen).glob("test-*.parquet")), f"{repo}:{chosen}")


def _from_parquet(files: list[Path], name: str) -> datasets.Dataset:
    import datasets

    if not files:
        raise EvalSetError(f"{name} holds no eval set (no save_to_disk files, no parquet files)")
    return datasets.Dataset.from_parquet([str(f) for f in files])


# ---- command line ------------------------------------------------------------------------------------------
@entry_point
def main(argv: list[str]) -> int:
    """``python data_scripts/make_eval_sets.py ...`` (``icl_conml make-eval-sets``)."""
    parser = OneLineParser(
        prog=command_name("python data_scripts/make_eval_sets.py", "icl_conml make-eval-sets"),
        description="Write fixed evaluation prompt sets (datasets, with a dataset card).",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=["linear_regression"],
        metavar="TASK",
        help=f"Function classes, one set each: {', '.join(TASKS)}, or your own as package.module:ClassName (default: linear_regression).",
    )
    parser.add_argument(
        "--n_dims",
        type=int,
        default=20,
        help="Input dimension d; must match the models evaluated (default: 20).",
    )
    parser.add_argument(
        "--n_points",
        type=int,
        default=41,
        help="(x, y) pairs per prompt; at most the models' n_positions (default: 41, Garg et al.'s 2d + 1).",
    )
    parser.add_argument("--n_prompts", type=int, default=1280, help="Prompts per set (default: 1280).")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the prompts: the same seed gives the same set (default: 0).",
    )
    parser.add_argument(
        "--ood", default=None, help="A distribution shift of icl_conml.evaluation (e.g. orthant)."
    )
    for key, kind in hyperparameter_fields().items():
        parser.add_argument(
            f"--{key}",
            type=kind,
            default=None,
            help="Task hyper-parameter (default: as in a training recipe).",
        )
    parser.add_argument(
        "--task_kwargs", default=None, help="More task hyper-parameters as JSON, e.g. '{\"depth\": 3}'."
    )
    parser.add_argument(
        "--output_dir",
        default="eval_sets",
        help="Folder that gets one sub-folder per set (default: eval_sets).",
    )
    parser.add_argument(
        "--push_to_hub", default=None, metavar="REPO", help="Also push each set to this dataset repo."
    )
    args = parser.parse_args(argv)
    command = shlex.join(["python", "data_scripts/make_eval_sets.py", *argv])
    try:
        overrides = json.loads(args.task_kwargs) if args.task_kwargs else {}
    except json.JSONDecodeError:
        raise EvalSetError(f"--task_kwargs {args.task_kwargs!r} is not JSON") from None
    try:
        if not isinstance(overrides, dict):
            raise EvalSetError(f"--task_kwargs {args.task_kwargs!r} must be a JSON object")
        overrides.update(
            {key: getattr(args, key) for key in hyperparameter_fields() if getattr(args, key) is not None}
        )
        taken = {f.name for task in args.tasks for f in dataclasses.fields(task_class(task))}
        unknown = sorted(set(overrides) - taken)
        if unknown:
            raise EvalSetError(f"{', '.join(args.tasks)} take no hyper-parameter {', '.join(unknown)}")
        for task in args.tasks:
            dataset = build_eval_set(
                task, args.n_dims, args.n_points, args.n_prompts, args.seed, args.ood, **overrides
            )
            name = set_name(task, args.n_dims, dataset[0]["n_points"], args.seed, args.ood)
            path = Path(args.output_dir) / name
            dataset.save_to_disk(str(path))
            build_card(name, dataset, command).save(str(path / "README.md"))
            print(f"wrote {path} ({len(dataset)} prompts, card README.md)")
            if args.push_to_hub:
                _push(dataset, args.push_to_hub, name, command)
                print(f"pushed {args.push_to_hub}:{name}")
    except UserError:
        raise
    except ValueError as error:  # a function class's own check of its hyper-parameters
        raise EvalSetError(str(error)) from None
    return 0


def _push(dataset: datasets.Dataset, repo: str, name: str, command: str) -> None:
    """The set as config ``name`` (split test) of ``repo``, and its section in the repository's card."""
    from huggingface_hub import DatasetCard

    dataset.push_to_hub(repo, config_name=name, split="test")
    card = DatasetCard.load(repo, repo_type="dataset")  # datasets wrote its configs/dataset_info metadata
    build_card(name, dataset, command, existing=card).push_to_hub(repo, repo_type="dataset")


if __name__ == "__main__":
    sys.exit(main())
