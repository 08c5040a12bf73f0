"""Loading what is evaluated: a model (folder or Hub id) and a fixed eval set (``datasets``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..data import Prompts
from ..tasks import get_task
from .arguments import EvaluationError
from .prompts import error_scale


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_model(name_or_path: str, device: str | torch.device = "cpu"):
    """An ``ICLModel`` from a local directory or a Hub id (the cache is used when offline)."""
    from ..modeling import ICLModel

    try:
        model = ICLModel.from_pretrained(name_or_path)
    except Exception as error:  # transformers/huggingface_hub raise many types for "not found"
        where = "local directory" if Path(name_or_path).exists() else "local path or Hub id"
        raise EvaluationError(
            f"cannot load model {name_or_path!r} ({where}): {_first_line(error)[:200]}; pass a training "
            f"output_dir (with config.json) or a Hub id that is in the Hugging Face cache or reachable online"
        ) from None
    return model.to(device).eval()


def load_eval_set(name: str) -> tuple[Prompts, dict[str, Any]]:
    """Prompts and metadata from a ``datasets`` eval set: a ``save_to_disk`` folder, or
    ``REPO`` / ``REPO:CONFIG`` on the Hub, from the HF cache when offline (written by
    ``data_scripts/make_eval_sets.py``; see ``eval_sets.load``)."""
    from .. import eval_sets

    try:
        dataset = eval_sets.load(name)
    except Exception as error:
        raise EvaluationError(
            f"cannot load eval set {name!r}: {_first_line(error)[:200]}; pass a folder written by "
            f"data_scripts/make_eval_sets.py or a Hub dataset REPO[:CONFIG]"
        ) from None
    missing = set(eval_sets.COLUMNS) - set(dataset.column_names)
    if missing:
        raise EvaluationError(
            f"eval set {name!r} lacks column(s) {', '.join(sorted(missing))}; build it with data_scripts/make_eval_sets.py"
        )
    first_row = dataset[0]
    metadata = {
        "task": first_row["task"],
        "n_dims": int(first_row["n_dims"]),
        "n_points": int(first_row["n_points"]),
        "seed": int(first_row["seed"]) if "seed" in dataset.column_names else None,
        "task_kwargs": json.loads(first_row.get("task_kwargs") or "{}"),
        "ood": first_row.get("ood") or None,
    }
    columns = [c for c in ("xs", "ys", "query_xs", "query_ys") if c in dataset.column_names]
    table = dataset.with_format("torch", columns=columns)[:]
    task = get_task(metadata["task"], metadata["n_dims"], **metadata["task_kwargs"])
    prompts = Prompts(
        table["xs"].float(),
        table["ys"].float(),
        table["query_xs"].float() if "query_xs" in table else None,
        table["query_ys"].float() if "query_ys" in table else None,
        error_scale(task, metadata["ood"]),
    )
    return prompts, metadata
