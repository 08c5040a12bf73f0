"""Pushing saved runs to the Hugging Face Hub, and the ``card`` / ``push`` commands.

During training, pushing is the Trainer's own Hub support (``push_to_hub``, ``hub_model_id``,
``hub_strategy``, ``hub_private_repo``; the run's files and card come from
``trainer.ConMLTrainer``'s saving hooks). This module pushes a finished local run later, and
turns a Hub failure into one line saying why and what to do (``HubPushError``). All Hub
traffic goes through ``transformers.utils.hub.hf_api()``::

    python -m icl_conml.hub card OUTPUT_DIR [--evaluation EVAL_DIR]
    python -m icl_conml.hub push OUTPUT_DIR --hub_model_id USER/NAME [--private]
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub import errors

from .errors import OneLineParser, UserError, command_name, entry_point

#: Never uploaded from a run folder (the Trainer's own push ignores the same).
PUSH_IGNORE = ["_*", "checkpoint-*"]


class HubPushError(UserError):
    """A push to the Hub failed (offline, not logged in, no write access, unreachable): one line
    saying why and what to do; exit status 2 like every user error."""


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
    from transformers.utils.hub import hf_api

    from .lora import record_repo_id
    from .model_card import write_model_card

    folder = Path(folder)
    write_model_card(folder, repo_id=repo_id)
    api = hf_api()
    repo = api.create_repo(repo_id, private=private, token=token, exist_ok=True)
    record_repo_id(folder, repo.repo_id)  # a LoRA run names its repo as the adapter's base
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
        prog=command_name("python -m icl_conml.hub", "icl_conml"),
        description="Write a saved run's model card, or push the run to the Hugging Face Hub.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    folder_help = (
        "a saved run: a training output_dir (or one of its checkpoint-N folders) holding config.json"
    )
    evaluation_help = (
        "an evaluation's output_dir (results.json, results.md, curves.png from `icl_conml eval`): "
        "copied into FOLDER; its table and plot go into the card, its numbers into the model-index"
    )
    card = commands.add_parser(
        "card",
        help="(re)write FOLDER/README.md",
        description="(Re)write the model card FOLDER/README.md from the run's own files.",
    )
    card.add_argument("folder", metavar="FOLDER", help=folder_help)
    card.add_argument("--evaluation", metavar="EVAL_DIR", help=evaluation_help)
    card.add_argument(
        "--hub_model_id",
        metavar="USER/NAME",
        help="the repo id the card's usage example loads (default: a placeholder)",
    )
    push = commands.add_parser(
        "push",
        help="push a saved run to the Hub",
        description="Push a saved run to the Hugging Face Hub (its card refreshed first; checkpoints stay local).",
    )
    push.add_argument("folder", metavar="FOLDER", help=folder_help)
    push.add_argument(
        "--hub_model_id",
        metavar="USER/NAME",
        required=True,
        help="the Hub repo to create or update (required)",
    )
    push.add_argument(
        "--private",
        action="store_true",
        help="create the repo private (an existing repo keeps its visibility)",
    )
    push.add_argument("--evaluation", metavar="EVAL_DIR", help=evaluation_help)
    args = parser.parse_args(argv)
    from .model_card import write_model_card

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
