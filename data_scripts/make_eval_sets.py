"""Write fixed evaluation prompt sets as ``datasets.Dataset`` so that models compare on identical prompts.

    python data_scripts/make_eval_sets.py --tasks linear_regression sparse_linear_regression \
        --n_dims 20 --n_points 41 --n_prompts 1280 --seed 0 --output_dir eval_sets \
        [--ood orthant] [--push_to_hub USER/icl-eval-sets]

Each set is one folder ``OUTPUT_DIR/<task>_d<d>_n<n>_s<seed>[_<ood>]`` (``save_to_disk``) with
one row per prompt: ``xs`` (n × d), ``ys`` (n), and the metadata columns ``task``,
``task_kwargs`` (JSON), ``n_dims``, ``n_points``, ``seed``, ``ood`` (plus ``query_xs`` and
``query_ys`` for the shifts whose query is not the next input). With ``--push_to_hub REPO``
each set becomes the ``test`` split of config ``<name>`` of that dataset repo (needs network
and a token). Evaluate on one with ``python -m icl_conml.evaluation --eval_set FOLDER`` or
``--eval_set REPO:CONFIG``. The prompts are exactly those ``--seed`` draws in the CLI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import datasets

from icl_conml.evaluation import EvaluationError, sample_prompts
from icl_conml.tasks import TASK_KWARGS, TASK_REGISTRY, get_task

DEFAULT_TASK_KWARGS = {"sparsity": 3, "noise_std": 0.5, "hidden_size": 100, "depth": 4}


def set_name(task: str, n_dims: int, n_points: int, seed: int, ood: str | None) -> str:
    name = f"{task}_d{n_dims}_n{n_points}_s{seed}"
    return name + (f"_{ood.replace('=', '')}" if ood else "")


def build_eval_set(
    task_name: str,
    n_dims: int,
    n_points: int,
    n_prompts: int,
    seed: int,
    ood: str | None = None,
    **task_kwargs,
) -> datasets.Dataset:
    """The prompts ``sample_prompts`` draws for these settings, as a Dataset with metadata columns."""
    kwargs = {key: task_kwargs.get(key, DEFAULT_TASK_KWARGS[key]) for key in TASK_KWARGS.get(task_name, ())}
    task = get_task(task_name, n_dims, **kwargs)
    prompts = sample_prompts(task, n_prompts, n_points, seed, ood)
    count, length = prompts.xs.shape[:2]
    columns = {
        "xs": prompts.xs.numpy(),
        "ys": prompts.ys.numpy(),
        "task": [task_name] * count,
        "task_kwargs": [json.dumps(kwargs)] * count,
        "n_dims": [n_dims] * count,
        "n_points": [length] * count,
        "seed": [seed] * count,
        "ood": [ood or ""] * count,
    }
    if prompts.queries is not None:
        columns["query_xs"] = prompts.queries.numpy()
        columns["query_ys"] = prompts.query_ys.numpy()
    features = datasets.Features(
        {
            "xs": datasets.Array2D((length, n_dims), "float32"),
            "ys": datasets.Sequence(datasets.Value("float32"), length=length),
            "task": datasets.Value("string"),
            "task_kwargs": datasets.Value("string"),
            "n_dims": datasets.Value("int32"),
            "n_points": datasets.Value("int32"),
            "seed": datasets.Value("int64"),
            "ood": datasets.Value("string"),
            **(
                {
                    "query_xs": datasets.Array2D((length, n_dims), "float32"),
                    "query_ys": datasets.Sequence(datasets.Value("float32"), length=length),
                }
                if prompts.queries is not None
                else {}
            ),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["linear_regression"], help=", ".join(TASK_REGISTRY))
    parser.add_argument("--n_dims", type=int, default=20)
    parser.add_argument("--n_points", type=int, default=41)
    parser.add_argument("--n_prompts", type=int, default=1280)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ood", default=None, help="A distribution shift of icl_conml.evaluation (e.g. orthant)."
    )
    for key, value in DEFAULT_TASK_KWARGS.items():
        parser.add_argument(f"--{key}", type=type(value), default=value)
    parser.add_argument("--output_dir", default="eval_sets")
    parser.add_argument(
        "--push_to_hub", default=None, metavar="REPO", help="Also push each set to this dataset repo."
    )
    args = parser.parse_args(argv)
    try:
        for task in args.tasks:
            if task not in TASK_REGISTRY:
                raise EvaluationError(f"unknown task {task!r}; choose from {', '.join(TASK_REGISTRY)}")
            kwargs = {key: getattr(args, key) for key in DEFAULT_TASK_KWARGS}
            dataset = build_eval_set(
                task, args.n_dims, args.n_points, args.n_prompts, args.seed, args.ood, **kwargs
            )
            name = set_name(task, args.n_dims, dataset[0]["n_points"], args.seed, args.ood)
            path = Path(args.output_dir) / name
            dataset.save_to_disk(str(path))
            print(f"wrote {path} ({len(dataset)} prompts)")
            if args.push_to_hub:
                dataset.push_to_hub(args.push_to_hub, config_name=name, split="test")
                print(f"pushed {args.push_to_hub}:{name}")
    except (EvaluationError, ValueError) as error:
        print(f"make_eval_sets: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
