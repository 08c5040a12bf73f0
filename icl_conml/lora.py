"""LoRA fine-tuning of a pretrained backbone with peft; loading and merging the adapters.

``prepare_model`` wraps an ``ICLModel`` in a ``peft.PeftModel``: LoRA adapters on the
backbone (whose own weights stay frozen) and the read-in / read-out trained in full as
peft's ``modules_to_save``. The Trainer then saves a small folder: ``adapter_config.json``
and ``adapter_model.safetensors`` (the adapters plus read-in/read-out), ``config.json`` (the
``ICLConfig``, which names the backbone) and ``README.md``.

Loading follows peft's convention (the base model, then ``PeftModel.from_pretrained(base,
run)``), from a folder or a Hub id alike: ``load_lora_model`` rebuilds the model around the
same pretrained backbone and attaches the adapter; ``merge`` folds the adapters into the
backbone and returns a plain ``ICLModel``. ``ICLModel.from_pretrained`` (and ``AutoModel``)
load full models only and name these two calls when given a LoRA run::

    python -m icl_conml.lora merge ADAPTER_DIR OUT_DIR
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D
from transformers.utils import find_adapter_config_file

from .arguments import ModelArguments, Recipe, RecipeError
from .errors import OneLineParser, UserError, command_name, entry_point
from .extras import require
from .model_card import ADAPTER_CONFIG_NAME, EVALUATION_FILES, RECIPE_NAME, STATE_NAME, write_model_card
from .modeling import ICLConfig, ICLModel, trusting_remote_code

if TYPE_CHECKING:  # peft is an extra (pip install 'icl_conml[peft]'): imported where LoRA is used
    from peft import LoraConfig, PeftModel

#: Modules outside the backbone that always train in full (saved with the adapter).
TRAINED_MODULES = ["read_in", "read_out"]
#: Leaf module types peft's LoRA can adapt.
ADAPTABLE_TYPES = (nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d)


def default_target_modules(backbone_config: PretrainedConfig) -> list[str]:
    """peft's default LoRA targets for the backbone's architecture (GPT-2: c_attn; Llama: q/v_proj)."""
    constants = require("peft.utils.constants", "LoRA")
    targets = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(backbone_config.model_type)
    if targets is None:
        raise RecipeError(
            f"no default LoRA target modules for a {backbone_config.model_type!r} backbone; "
            f"set lora_target_modules to the names of its linear layers"
        )
    return list(targets)


def adaptable_module_names(backbone: nn.Module) -> list[str]:
    """Names (last component) of the backbone's modules that LoRA can target."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, ADAPTABLE_TYPES)}
    )


def lora_config(model: ICLModel, args: ModelArguments) -> LoraConfig:
    """The ``LoraConfig`` for ``args``, with target modules checked against the backbone."""
    backbone = model.backbone
    targets = list(args.lora_target_modules or default_target_modules(backbone.config))
    available = adaptable_module_names(backbone)
    for target in targets:
        if target not in available:
            raise RecipeError(
                f"lora_target_modules: {target!r} is not a module of the {type(backbone).__name__} backbone; "
                f"available: {', '.join(available)}"
            )
    # GPT-2's Conv1D stores weights as (in, out): peft must be told.
    fan_in_fan_out = any(
        isinstance(m, Conv1D) for name, m in backbone.named_modules() if name.rsplit(".", 1)[-1] in targets
    )
    return require("peft", "LoRA").LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        modules_to_save=list(TRAINED_MODULES),
    )


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Hide the one harmless warning peft triggers on every wrap: it reads the model's
    ``is_gradient_checkpointing``, which transformers 5 deprecates (a FutureWarning per call)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def prepare_model(model: ICLModel, args: ModelArguments) -> ICLModel | PeftModel:
    """Apply the recipe's LoRA / freezing: LoRA → a ``PeftModel``; ``freeze_backbone`` → frozen backbone."""
    if args.lora_r > 0:
        with _quiet_peft():
            return require("peft", "LoRA").get_peft_model(model, lora_config(model, args))
    if args.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model


def resolve_backbone_path(recipe: Recipe) -> None:
    """Record a local ``backbone_name_or_path`` as an absolute path (Hub ids stay as written).

    The path is recorded in the run's ``config.json``, ``recipe.yaml`` and history, and loading the
    run later (evaluation, merge, resume) reads it from there: a path relative to the directory the
    run was started in would break from anywhere else. A path-like value (``./x``, ``/x``, ``~/x``,
    ``a/b/c``) that is no folder is refused here in one line; anything else is a Hub id.
    """
    name = recipe.model.backbone_name_or_path
    if not name:
        return
    path = Path(name).expanduser()
    if path.exists():
        recipe.model.backbone_name_or_path = str(path.resolve())
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise RecipeError(
            f"backbone_name_or_path={name!r} looks like a path but {path.absolute()} does not exist; pass the "
            f"folder of a saved pretrained model (relative to {Path.cwd()} or absolute), or a Hub id such as gpt2"
        )


def is_lora_checkpoint(name_or_path: str | Path, **hub_kwargs) -> bool:
    """Whether a folder or Hub repo holds a LoRA adapter (``adapter_config.json``)."""
    return find_adapter_config_file(str(name_or_path), **hub_kwargs) is not None


def record_repo_id(folder: str | Path, repo_id: str) -> bool:
    """Name the Hub repo a LoRA run is pushed to as its adapter's ``base_model_name_or_path``.

    ``AutoModel.from_pretrained(HUB_ID)`` (and ``peft.AutoPeftModel``) on an adapter repo load
    whatever the adapter's ``base_model_name_or_path`` names, not the id they were given (a local
    folder holding a ``config.json`` keeps its own path). A run's base model is the ``ICLModel``
    described by the ``config.json`` next to the adapter, so the repo names itself: those calls
    then reach ``ICLModel.from_pretrained`` on the run, whose one-line error names
    ``load_lora_model`` and ``merge``, instead of loading some other model. Called before every
    push (the Trainer's saving hooks, ``icl_conml.hub``). Returns whether ``folder`` held an
    adapter to update.
    """
    path = Path(folder) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    if config.get("base_model_name_or_path") != repo_id:
        config["base_model_name_or_path"] = repo_id
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def load_lora_model(
    name_or_path: str | Path,
    *,
    is_trainable: bool = False,
    attn_implementation: str = "sdpa",
    backbone_name_or_path: str | None = None,
    trust_remote_code: bool = False,
    **hub_kwargs,
) -> PeftModel:
    """A saved LoRA run (folder or Hub id) on its pretrained backbone, adapters attached.

    The backbone loads from the name recorded in ``config.json`` unless
    ``backbone_name_or_path`` points at the same pretrained model elsewhere (a moved folder).
    ``hub_kwargs`` (revision, token, cache_dir, local_files_only, ...) apply to the run's repository.
    A task named by import path in ``config.json`` is imported only with ``trust_remote_code``.
    """
    name_or_path = str(name_or_path)
    config = ICLConfig.from_pretrained(name_or_path, **hub_kwargs)
    backbone = backbone_name_or_path or config.backbone_name_or_path
    if not backbone:
        raise ValueError(
            f"{name_or_path} has no backbone_name_or_path in its config.json: "
            f"it is not a LoRA run of icl_conml; load it with ICLModel.from_pretrained"
        )
    try:
        with trusting_remote_code(trust_remote_code):
            base = ICLModel.from_pretrained_backbone(
                backbone,
                attn_implementation=attn_implementation,
                n_dims=config.n_dims,
                n_positions=config.n_positions,
                task=config.task,
                task_kwargs=config.task_kwargs,
                dropout=config.dropout,
            )
    except OSError as error:
        first = (str(error).strip().splitlines() or [""])[0]
        relative = (
            " (a relative path: it was recorded relative to the directory the run was trained in)"
            if backbone == config.backbone_name_or_path
            and not Path(backbone).is_absolute()
            and "/" in backbone
            else ""
        )
        raise OSError(
            f"the LoRA run {name_or_path} needs its pretrained backbone {backbone!r}{relative}, which could not "
            f"be loaded ({first}); set backbone_name_or_path in the run's config.json to that model's folder "
            f"(absolute path) or Hub id, or pass load_lora_model(..., backbone_name_or_path=...) in Python"
        ) from error
    peft = require("peft", f"the LoRA run {name_or_path}")
    with _quiet_peft():
        return peft.PeftModel.from_pretrained(base, name_or_path, is_trainable=is_trainable, **hub_kwargs)


def merge(
    source: str | Path | PeftModel,
    output_dir: str | Path | None = None,
    *,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    **hub_kwargs,
) -> ICLModel:
    """Fold the LoRA adapters into the backbone: a plain ``ICLModel`` (saved to ``output_dir`` if given).

    The merged folder loads with ``ICLModel.from_pretrained`` / ``AutoModel.from_pretrained``
    alone (safetensors, no peft); its model card is rebuilt from the run's files.
    """
    if hasattr(source, "merge_and_unload"):  # a PeftModel
        model = source
    else:
        model = load_lora_model(
            source, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code, **hub_kwargs
        )
    merged = model.merge_and_unload()
    if output_dir is not None:
        output_dir = Path(output_dir)
        merged.save_pretrained(output_dir)
        if isinstance(source, str | Path) and Path(source).is_dir():
            for name in (RECIPE_NAME, STATE_NAME, *EVALUATION_FILES):
                if (Path(source) / name).is_file():
                    shutil.copy(Path(source) / name, output_dir / name)
        write_model_card(output_dir)
    return merged


@entry_point
def main(argv: list[str]) -> int:
    """``python -m icl_conml.lora merge ADAPTER OUTPUT_DIR`` (``icl_conml merge``)."""
    parser = OneLineParser(
        prog=command_name("python -m icl_conml.lora", "icl_conml"), description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    merge_cmd = commands.add_parser("merge", help="export a LoRA run as a plain ICLModel")
    merge_cmd.add_argument("adapter", help="folder or Hub id of the LoRA run (adapter_config.json)")
    merge_cmd.add_argument("output_dir", help="where the merged model goes")
    merge_cmd.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="import the task its config.json names by import path (runs that code)",
    )
    args = parser.parse_args(argv)
    try:
        found = is_lora_checkpoint(args.adapter)
    except OSError:  # neither a folder nor a valid Hub id
        found = False
    if not found:
        raise UserError(
            f"{args.adapter} holds no adapter_config.json; pass the folder (or Hub id) of a run trained "
            f"with lora_r > 0"
        )
    merge(
        args.adapter, args.output_dir, trust_remote_code=args.trust_remote_code
    )  # MissingExtra (no peft): one line, exit 2
    print(f"merged {args.adapter} into {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
