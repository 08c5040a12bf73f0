"""Loading what is evaluated: a model (folder or Hub id) and a fixed eval set (``datasets``)."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import torch

from ..data import PromptError, Prompts, ood_error_scale
from ..registry import RemoteCodeError
from ..tasks import get_task
from .arguments import EvaluationError

logger = logging.getLogger("icl_conml")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_model(
    name_or_path: str,
    device: str | torch.device = "cpu",
    allow_unfinished: bool = False,
    trust_remote_code: bool = False,
):
    """An ``ICLModel`` from a local directory or a Hub id (the cache is used when offline).

    A task that ``config.json`` names by import path is imported only with ``trust_remote_code``
    (transformers' convention); otherwise one line says what to pass, before anything is imported.

    Refused in one line: a training output_dir whose run has not finished (``run_status.json``;
    ``allow_unfinished`` evaluates it anyway), a folder of another kind of model (``config.json``'s
    ``model_type``), weights that do not hold every tensor of the model (``from_pretrained`` would
    initialise the missing ones at random and evaluate them), and NaN/inf weights (every error
    would be NaN).
    """
    from ..lora import is_lora_checkpoint, merge
    from ..modeling import ICLModel

    if not allow_unfinished:
        _check_run_finished(name_or_path)
    _check_model_folder(name_or_path, ICLModel.config_class.model_type)
    try:
        lora = bool(is_lora_checkpoint(name_or_path))
    except Exception:  # noqa: BLE001 - not resolvable: from_pretrained reports it
        lora = False
    try:
        if lora:  # adapters merged onto their backbone
            model, info = merge(name_or_path, trust_remote_code=trust_remote_code), {}
        else:
            model, info = ICLModel.from_pretrained(
                name_or_path, output_loading_info=True, trust_remote_code=trust_remote_code
            )
    except RemoteCodeError as error:
        raise EvaluationError(f"model {name_or_path!r}: {error}") from None
    except OSError as error:
        if lora:  # the run was found; its backbone was not (the message names the fix)
            raise EvaluationError(f"cannot load model {name_or_path!r}: {_first_line(error)}") from None
        raise EvaluationError(_not_found(name_or_path, error)) from None
    except Exception as error:  # transformers/huggingface_hub raise many types for "not found"
        raise EvaluationError(_not_found(name_or_path, error)) from None
    total = len(model.state_dict())
    missing = sorted(info.get("missing_keys") or []) + [str(m[0]) for m in info.get("mismatched_keys") or []]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise EvaluationError(
            f"model {name_or_path!r} is not a trained ICLModel: its weights lack {len(missing)} of the model's "
            f"{total} tensors ({shown}), which would be evaluated at their random initial values; pass a "
            f"training output_dir or one of its checkpoint-N folders"
        )
    poisoned = [name for name, tensor in model.state_dict().items() if not torch.isfinite(tensor).all()]
    if poisoned:
        raise EvaluationError(
            f"model {name_or_path!r} holds NaN/inf in {len(poisoned)} of its {total} weight tensors "
            f"({', '.join(poisoned[:3])}); every error would be NaN: evaluate an earlier checkpoint of the run"
        )
    return model.to(device).eval()


def _check_run_finished(name_or_path: str) -> None:
    """A training output_dir whose ``run_status.json`` is not ``finished`` holds no final model of
    that run: the files there may be an earlier run's (an interrupted overwrite) or missing."""
    from ..runs.record import STATUS_NAME, read_status

    if not (Path(name_or_path) / STATUS_NAME).is_file():
        return  # a checkpoint-N folder, a Hub model, a run from before run_status.json
    status = read_status(name_or_path)
    state = status.get("status", "unreadable")
    if state == "finished":
        return
    at = f" at step {status['step']}" if isinstance(status.get("step"), int) else ""
    raise EvaluationError(
        f"model {name_or_path!r} is a training run that has not finished ({STATUS_NAME}: {state}{at}): its "
        f"final model may be missing or an earlier run's; evaluate one of its checkpoint-N folders, finish the "
        f"run (--resume_from_checkpoint latest), or pass --allow_unfinished true to evaluate it anyway"
    )


def _not_found(name_or_path: str, error: Exception) -> str:
    where = "local directory" if Path(name_or_path).exists() else "local path or Hub id"
    reason = textwrap.shorten(_first_line(error), 300, placeholder=" ...")  # cut between words
    return (
        f"cannot load model {name_or_path!r} ({where}): {reason}; pass a training output_dir (with "
        f"config.json) or a Hub id that is in the Hugging Face cache or reachable online"
    )


def _check_model_folder(name_or_path: str, model_type: str) -> None:
    """A local folder must hold an ``ICLModel``'s ``config.json`` (not, say, a plain GPT-2)."""
    config_file = Path(name_or_path) / "config.json"
    if not config_file.is_file():
        return  # a Hub id, or a folder from_pretrained reports itself
    try:
        found = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise EvaluationError(f"model {name_or_path!r}: config.json is unreadable (not JSON)") from None
    if found != model_type:
        raise EvaluationError(
            f"model {name_or_path!r} holds a {found!r} model (config.json model_type), not an icl_conml "
            f"ICLModel ({model_type!r}); pass a training output_dir or one of its checkpoint-N folders"
        )


#: How an eval set is made, for the errors that ask for one (the installed command; the script in a
#: source checkout is the same code).
MAKE_EVAL_SETS = "`icl_conml make-eval-sets` (data_scripts/make_eval_sets.py in a checkout)"


def _check_fingerprint(name: str, dataset, table: dict[str, torch.Tensor], described: dict[str, Any]) -> None:
    """Every row carries the same metadata, and prompts + metadata (``described``: the set's
    ``eval_sets.describe``) match the fingerprint stored when the set was made
    (``eval_sets.fingerprint``); a set without one is only warned about."""
    from .. import eval_sets

    for column in (*eval_sets.METADATA_COLUMNS, "fingerprint"):
        if column in dataset.column_names and len(dataset.unique(column)) > 1:
            raise EvaluationError(
                f"eval set {name!r}: its rows disagree on {column!r} (it was edited after it was made); "
                f"rebuild it with {MAKE_EVAL_SETS}"
            )
    if "fingerprint" not in dataset.column_names:
        logger.warning(
            "eval set %r has no fingerprint (made by an older version): it cannot be checked", name
        )
        return
    tensors = {column: table[column].float() for column in eval_sets.PROMPT_COLUMNS if column in table}
    recorded = dataset[0]["fingerprint"]
    if eval_sets.fingerprint(tensors, described) != recorded:
        raise EvaluationError(
            f"eval set {name!r} does not match its fingerprint: its prompts or metadata (task, n_dims, "
            f"task_kwargs, seed, ...) were changed after it was made; rebuild it with "
            f"{MAKE_EVAL_SETS}"
        )


def load_eval_set(name: str, trust_remote_code: bool = False) -> tuple[Prompts, dict[str, Any]]:
    """Prompts and metadata from a ``datasets`` eval set: a ``save_to_disk`` folder, or
    ``REPO`` / ``REPO:CONFIG`` on the Hub, from the HF cache when offline (written by
    ``data_scripts/make_eval_sets.py``; see ``eval_sets.load``). A task its metadata names by
    import path is imported only with ``trust_remote_code`` (or when this process knows it)."""
    from .. import eval_sets

    try:
        dataset = eval_sets.load(name)
    except Exception as error:
        raise EvaluationError(
            f"cannot load eval set {name!r}: {_first_line(error)[:200]}; pass a folder written by "
            f"`icl_conml make-eval-sets` or a Hub dataset REPO[:CONFIG]"
        ) from None
    missing = set(eval_sets.COLUMNS) - set(dataset.column_names)
    if missing:
        raise EvaluationError(
            f"eval set {name!r} lacks column(s) {', '.join(sorted(missing))}; build it with {MAKE_EVAL_SETS}"
        )
    described = eval_sets.describe(dataset)  # the first row's settings, and the number of prompts
    metadata = {key: described[key] for key in ("task", "n_dims", "n_points", "seed", "task_kwargs", "ood")}
    columns = [c for c in ("xs", "ys", "query_xs", "query_ys") if c in dataset.column_names]
    table = dataset.with_format("torch", columns=columns)[:]
    _check_fingerprint(name, dataset, table, described)
    try:
        task = get_task(
            metadata["task"], metadata["n_dims"], allow_import=trust_remote_code, **metadata["task_kwargs"]
        )
    except RemoteCodeError as error:
        raise EvaluationError(f"eval set {name!r}: {error}") from None
    try:
        scale = ood_error_scale(task, metadata["ood"])
    except PromptError as error:
        raise EvaluationError(f"eval set {name!r}: {error}") from None
    prompts = Prompts(
        table["xs"].float(),
        table["ys"].float(),
        table["query_xs"].float() if "query_xs" in table else None,
        table["query_ys"].float() if "query_ys" in table else None,
        scale,
    )
    return prompts, metadata
