"""Model cards and Hub pushes for icl_conml runs.

Every model folder the Trainer saves (each checkpoint, the final model) and every merged LoRA
export gets a ``README.md`` model card: task and dimensions, backbone, ConML settings, a
training summary from the log history, the full recipe, and, when an evaluation's
``results.json`` sits in the folder, its table and curve plot; Hub metadata (tags,
``library_name``) so the Hub lists it properly.

Pushing is the Trainer's own Hub support (``push_to_hub``, ``hub_model_id``, ``hub_strategy``,
``hub_private_repo``); ``ModelCardMixin`` only makes it write and upload this card instead of
the Trainer's generic one. All Hub traffic goes through ``transformers.utils.hub.hf_api()``.
A finished local run can be pushed (or its card refreshed after an evaluation) later::

    python -m icl_conml.hub card OUTPUT_DIR [--evaluation EVAL_DIR]
    python -m icl_conml.hub push OUTPUT_DIR --hub_model_id USER/NAME [--private]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData, errors
from transformers.utils.hub import hf_api

from . import __version__
from .config import RecipeError
from .errors import OneLineParser, UserError, command_name, entry_point
from .modeling import ICLConfig

logger = logging.getLogger(__name__)

RECIPE_NAME = "recipe.yaml"
STATE_NAME = "trainer_state.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
EVALUATION_FILES = ("results.json", "results.md", "curves.png")
#: Never uploaded from a run folder (the Trainer's own push ignores the same).
PUSH_IGNORE = ["_*", "checkpoint-*"]
_TRAIN_KEYS = ("loss", "icl_loss", "conml_loss", "d_in", "d_out", "grad_norm", "learning_rate")


# ---- the card -------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def training_summary(log_history: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(metric, value) pairs: the last training log, the last evaluation, the run totals."""
    rows: list[tuple[str, Any]] = []
    train_logs = [entry for entry in log_history if "loss" in entry]
    eval_logs = [entry for entry in log_history if "eval_loss" in entry]
    steps = max((entry.get("step", 0) for entry in log_history), default=0)
    if steps:
        rows.append(("steps", steps))
    if train_logs:
        last = train_logs[-1]
        rows += [(f"{key} (step {last.get('step')})", last[key]) for key in _TRAIN_KEYS if key in last]
    if eval_logs:
        last = eval_logs[-1]
        skip = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
        rows += [
            (f"{key} (step {last.get('step')})", value)
            for key, value in last.items()
            if key.startswith("eval_") and key not in skip
        ]
    for entry in log_history:
        for key in ("train_loss", "train_runtime"):
            if key in entry:
                rows.append((key, entry[key]))
    return rows


def _curve(value: Any) -> list[float] | None:
    """A curve as a list of errors: a plain list, or the ``mean`` of a curve given with its interval."""
    if isinstance(value, dict):
        value = value.get("mean", value.get("error"))
    if isinstance(value, list) and all(isinstance(v, int | float) or v is None for v in value):
        return value
    return None


def _evaluation_section(folder: Path) -> str:
    """The evaluation's own table (results.md) or one built from results.json, and its plot."""
    results_md, results_json = folder / "results.md", folder / "results.json"
    if not results_json.is_file() and not results_md.is_file():
        return ""
    parts = ["## Evaluation", ""]
    if results_md.is_file():
        parts.append(results_md.read_text().strip())
    else:
        results = json.loads(results_json.read_text())
        curves = {name: _curve(value) for name, value in (results.get("curves") or {}).items()}
        curves = {name: curve for name, curve in curves.items() if curve}
        if curves:
            names = list(curves)
            length = max(len(curve) for curve in curves.values())
            shown = sorted({k for k in (0, 1, 2, 4, 8, 16, 32, 64, 128) if k < length} | {length - 1})
            rows = [(k, *(curves[n][k] if k < len(curves[n]) else "" for n in names)) for k in shown]
            parts.append("Normalised squared error after k in-context examples:\n")
            parts.append(_table(("k", *names), rows))
        needed = results.get("needed_context_length")
        if needed:
            parts += ["", "Needed context length: `" + json.dumps(needed) + "`"]
    if (folder / "curves.png").is_file():
        parts += ["", "![error against the number of in-context examples](curves.png)"]
    return "\n".join(parts) + "\n"


def _usage(repo: str, adapter: bool) -> str:
    if adapter:
        return (
            "```python\nfrom icl_conml.lora import load_lora_model, merge\n\n"
            f'model = load_lora_model("{repo}")  # the pretrained backbone + these adapters\n'
            f'plain = merge("{repo}", "merged/")  # or: a plain ICLModel\n'
            "out = model(xs=xs, ys=ys)  # xs (B, n, d), ys (B, n) -> out.predictions (B, n)\n```\n"
        )
    return (
        "```python\nimport icl_conml  # registers the model with the Auto classes\n"
        "from transformers import AutoModel\n\n"
        f'model = AutoModel.from_pretrained("{repo}")  # or icl_conml.ICLModel.from_pretrained\n'
        "out = model(xs=xs, ys=ys)  # xs (B, n, d), ys (B, n) -> out.predictions (B, n)\n```\n"
    )


def build_model_card(
    folder: str | Path,
    *,
    log_history: list[dict[str, Any]] | None = None,
    conml_settings: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The model card of a saved model folder, from the folder's own files.

    ``log_history`` and ``conml_settings`` default to what ``trainer_state.json`` and
    ``recipe.yaml`` in the folder say (the Trainer passes its live values).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: not a saved icl_conml model folder")
    config = ICLConfig.from_pretrained(folder)
    adapter = (folder / ADAPTER_CONFIG_NAME).is_file()
    recipe_text = (folder / RECIPE_NAME).read_text() if (folder / RECIPE_NAME).is_file() else ""
    recipe = (yaml.safe_load(recipe_text) or {}) if recipe_text else {}
    if log_history is None and (folder / STATE_NAME).is_file():
        log_history = json.loads((folder / STATE_NAME).read_text()).get("log_history", [])
    if conml_settings is None:
        conml_settings = {key: value for key, value in recipe.items() if key.startswith("conml_")}
    conml_lambda = float(conml_settings.get("conml_lambda", 0) or 0)

    backbone = config.backbone_config
    pretrained = config.backbone_name_or_path
    on_hub = bool(pretrained) and not os.path.exists(pretrained)
    tags = ["icl_conml", "in-context-learning", "meta-learning", config.task]
    tags += ["conml"] if conml_lambda > 0 else []
    tags += ["lora"] if adapter else []
    data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        tags=tags,
        base_model=pretrained if on_hub else None,
    )
    name = repo_id.split("/")[-1] if repo_id else folder.resolve().name
    objective = f"ConML (λ = {conml_lambda:g})" if conml_lambda > 0 else "plain ICL (no ConML)"
    backbone_desc = f"pretrained `{pretrained}`" if pretrained else "GPT-2 trained from scratch"
    body = [
        f"# {name}",
        "",
        f"An in-context learner for **{config.task}** (inputs of dimension d = {config.n_dims}, up to "
        f"{config.n_positions} (x, y) pairs per prompt), meta-trained with "
        f"icl_conml {__version__} and {objective}: it reads a "
        f"prompt (x₁, y₁, …, x_k, y_k, x_query) and predicts y_query from the examples alone.",
        "",
        "## Model",
        "",
        _table(
            ("field", "value"),
            [
                ("task", config.task),
                ("task arguments", json.dumps(config.task_kwargs) if config.task_kwargs else "-"),
                ("n_dims", config.n_dims),
                ("n_positions (pairs)", config.n_positions),
                ("backbone", f"{backbone.model_type} ({backbone_desc})"),
                ("hidden size / layers / heads", f"{config.n_embd} / {config.n_layer} / {config.n_head}"),
                (
                    "weights",
                    "LoRA adapters + read-in/read-out (safetensors)"
                    if adapter
                    else "full model (safetensors)",
                ),
            ],
        ),
        "",
        "## Usage",
        "",
        _usage(repo_id or "PATH_OR_HUB_ID", adapter),
    ]
    if conml_settings:
        body += [
            "## ConML",
            "",
            _table(("setting", "value"), sorted(conml_settings.items())),
            "",
        ]
    rows = training_summary(log_history or [])
    if rows:
        body += ["## Training summary", "", _table(("metric", "value"), rows), ""]
    evaluation = _evaluation_section(folder)
    if evaluation:
        body.append(evaluation)
    if recipe_text:
        body += [
            "## Recipe",
            "",
            f"Reproduce with `python -m icl_conml.train {RECIPE_NAME}`:",
            "",
            "```yaml",
            recipe_text.rstrip(),
            "```",
            "",
        ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_model_card(
    folder: str | Path, *, evaluation_dir: str | Path | None = None, **card_kwargs: Any
) -> Path:
    """Write ``folder/README.md``; ``evaluation_dir``'s results and plot are copied in first."""
    folder = Path(folder)
    if evaluation_dir is not None:
        evaluation_dir = Path(evaluation_dir)
        if not (evaluation_dir / "results.json").is_file():
            raise FileNotFoundError(f"{evaluation_dir} holds no results.json: run the evaluation first")
        for name in EVALUATION_FILES:
            if (evaluation_dir / name).is_file() and evaluation_dir.resolve() != folder.resolve():
                shutil.copy(evaluation_dir / name, folder / name)
    path = folder / "README.md"
    build_model_card(folder, **card_kwargs).save(path)
    return path


class ModelCardMixin:
    """``Trainer`` mixin: our model card in every folder it saves, and the one it pushes.

    ``_save`` runs for checkpoints (before the Trainer pushes them), the final model and
    ``push_to_hub``; a LoRA model also gets its ``ICLConfig`` (the backbone to rebuild on) and
    each checkpoint gets a copy of the run's ``recipe.yaml``.
    """

    def _card_kwargs(self) -> dict[str, Any]:
        conml_args = getattr(self, "conml_args", None)
        return {
            "log_history": self.state.log_history,
            "conml_settings": dataclasses.asdict(conml_args) if conml_args is not None else None,
            "repo_id": getattr(self, "hub_model_id", None) or self.args.hub_model_id,
        }

    def _write_card(self, folder: Path) -> None:
        # A card is documentation: a failure to write one (say, a malformed results.json
        # someone dropped in) must never stop a training run or lose its checkpoint.
        try:
            write_model_card(folder, **self._card_kwargs())
        except Exception as error:  # noqa: BLE001
            logger.warning(
                "could not write the model card in %s: %s: %s", folder, type(error).__name__, error
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:  # other processes of a multi-process run write nothing
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):  # a peft model saves only its adapter files
            model.get_base_model().config.save_pretrained(folder)
            if self.args.push_to_hub:  # so that AutoModel.from_pretrained(repo id) loads the run
                from .lora import record_repo_id

                record_repo_id(folder, getattr(self, "hub_model_id", None) or push_repo_id(self.args))
        recipe = Path(self.args.output_dir) / RECIPE_NAME
        if recipe.is_file() and recipe.resolve() != (folder / RECIPE_NAME).resolve():
            shutil.copy(recipe, folder / RECIPE_NAME)
        self._write_card(folder)

    def create_model_card(self, **kwargs: Any) -> None:
        """Called by ``Trainer.push_to_hub`` right before the upload: our card, not the generic one."""
        if self.is_world_process_zero():
            self._write_card(Path(self.args.output_dir))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The Trainer copies only weights and config from the checkpoint into output_dir before
        # uploading output_dir; bring the checkpoint's card along so the repo's card is current.
        card = Path(checkpoint_folder) / "README.md"
        if self.is_world_process_zero() and card.is_file():
            shutil.copy(card, Path(self.args.output_dir) / "README.md")
        super()._push_from_checkpoint(checkpoint_folder)


# ---- pushing ----------------------------------------------------------------------------------------
class HubPushError(RecipeError):
    """A push to the Hub failed: one line saying why and what to do."""


_PUSH_ERRORS = (
    errors.OfflineModeIsEnabled,
    errors.LocalTokenNotFoundError,
    errors.HFValidationError,
    errors.HTTPError,
)


def _reason_and_fix(error: BaseException, repo_id: str) -> tuple[str, str]:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, errors.OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE=1)", "unset HF_HUB_OFFLINE on a machine with network"
    if isinstance(error, errors.LocalTokenNotFoundError) or status == 401:
        return (
            "not logged in (or the token is invalid)",
            "run `hf auth login` (or set HF_TOKEN) with a write token",
        )
    if status == 403:
        return (
            f"the token may not write to {repo_id}",
            "use a write token for that namespace or set hub_model_id to a repo under your own user name",
        )
    if isinstance(error, errors.HFValidationError):
        return f"hub_model_id={repo_id!r} is not a valid repo id", "use the form user/name"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"the Hub is unreachable ({type(error).__name__}: {first})", "check the network"


def explain_push_error(error: BaseException, repo_id: str, output_dir: str, *, trained: bool) -> str:
    """One line: why pushing a run to ``repo_id`` failed and what to do about it."""
    reason, fix = _reason_and_fix(error, repo_id)
    push_later = f"python -m icl_conml.hub push {output_dir} --hub_model_id {repo_id}"
    if trained:
        return (
            f"training finished and {output_dir} holds the model and checkpoints, but pushing to {repo_id} "
            f"failed: {reason}; {fix}, then run `{push_later}`"
        )
    return (
        f"push_to_hub: cannot create the Hub repo {repo_id}: {reason}; {fix}, or set push_to_hub: false "
        f"and push the finished run with `{push_later}` (nothing was trained)"
    )


def push_repo_id(args: Any) -> str:
    """The repo the Trainer pushes to: ``hub_model_id``, else the output folder's name."""
    return args.hub_model_id or Path(args.output_dir).absolute().name


@contextlib.contextmanager
def push_errors_explained(args: Any, *, trained: bool) -> Iterator[None]:
    """Turn a Hub failure inside the block into a ``HubPushError`` (one line) when pushing is on."""
    try:
        yield
    except _PUSH_ERRORS as error:
        if not args.push_to_hub:
            raise
        message = explain_push_error(error, push_repo_id(args), args.output_dir, trained=trained)
        raise HubPushError(message) from error


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload icl_conml model",
) -> Any:
    """Push a saved run (its final model folder) to ``repo_id``, refreshing its card first."""
    folder = Path(folder)
    write_model_card(folder, repo_id=repo_id)
    api = hf_api()
    repo = api.create_repo(repo_id, private=private, token=token, exist_ok=True)
    from .lora import record_repo_id  # a LoRA run names its repo as the adapter's base (AutoModel)

    record_repo_id(folder, repo.repo_id)
    return api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=folder,
        commit_message=commit_message,
        token=token,
        ignore_patterns=PUSH_IGNORE,
    )


@entry_point
def main(argv: list[str]) -> int:
    """``python -m icl_conml.hub card|push FOLDER ...`` (``icl_conml card`` / ``icl_conml push``)."""
    parser = OneLineParser(
        prog=command_name("python -m icl_conml.hub", "icl_conml"), description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    card = commands.add_parser("card", help="(re)write FOLDER/README.md")
    card.add_argument("folder")
    card.add_argument("--evaluation", help="folder of an evaluation (results.json) to include")
    card.add_argument("--hub_model_id", help="the repo id shown in the usage example")
    push = commands.add_parser("push", help="push a saved run to the Hub")
    push.add_argument("folder")
    push.add_argument("--hub_model_id", required=True)
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--evaluation", help="folder of an evaluation (results.json) to include")
    args = parser.parse_args(argv)
    try:
        if args.evaluation:
            write_model_card(args.folder, evaluation_dir=args.evaluation, repo_id=args.hub_model_id)
        if args.command == "card":
            print(write_model_card(args.folder, repo_id=args.hub_model_id))
        else:
            info = push_folder(args.folder, args.hub_model_id, private=args.private or None)
            print(f"pushed {args.folder} to {getattr(info, 'commit_url', args.hub_model_id)}")
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    except _PUSH_ERRORS as error:
        reason, fix = _reason_and_fix(error, args.hub_model_id)
        raise HubPushError(f"pushing {args.folder} to {args.hub_model_id} failed: {reason}; {fix}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
