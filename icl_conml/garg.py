"""Garg et al.'s checkpoints as ``ICLModel`` folders: evaluate their released models here.

``dtsip/in-context-learning`` (Garg et al. 2022) trains a ``TransformerModel``: ``_read_in``
Linear(n_dims, n_embd) → ``_backbone`` GPT2Model(n_positions=2·n_positions, dropout 0) →
``_read_out`` Linear(n_embd, 1), predicting at the x tokens (``[:, ::2, 0]``) of the prompt
[x_1, (y_1, 0, …), x_2, …]: the architecture and token layout of ``ICLModel``. A run folder
holds ``state.pt`` (``{"model_state_dict", "optimizer_state_dict", "train_step"}``; or a
``model_<step>.pt`` state dict) and ``config.yaml`` (``model: {family: gpt2, n_dims,
n_positions, n_embd, n_layer, n_head}``, ``training: {task, task_kwargs, curriculum, …}``).

    python -m icl_conml.convert_garg STATE_PT CONFIG_YAML OUT_DIR

Mapping: ``_read_in``/``_backbone``/``_read_out`` → ``read_in``/``backbone``/``read_out``. The
backbone keeps their position table as it is, 2·n_positions rows (an ``ICLModel`` built from a
recipe has one more, for a ConML probe after a full prompt): prompts of up to n_positions pairs
predict exactly as theirs. Dropped: GPT-2's token embedding (50257 rows, never used: the model
reads ``inputs_embeds``; ours has a 1-row one) and the ``attn.bias``/``attn.masked_bias``
buffers that checkpoints saved under transformers 4.x carry. Their task names map to ours
(``relu_2nn_regression`` → ``relu_2nn``, ``hidden_layer_size`` → ``hidden_size``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import GPT2Config

from .errors import OneLineParser, UserError, command_name, entry_point
from .modeling import ICLConfig, ICLModel
from .tasks import TASKS

#: Garg et al.'s task names → ours (the same name where absent).
TASK_NAMES = {"relu_2nn_regression": "relu_2nn"}
#: Their task keyword arguments → ours.
TASK_KWARG_NAMES = {"hidden_layer_size": "hidden_size"}
#: Buffers of transformers 4.x GPT-2 attention layers (causal mask, mask value): not weights.
_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")
_PREFIXES = {"_read_in.": "read_in.", "_backbone.": "backbone.", "_read_out.": "read_out."}


class GargConversionError(UserError, ValueError):
    """The files are not a Garg et al. TransformerModel checkpoint (one line, exit 2)."""


def read_config(path: str | Path) -> dict[str, Any]:
    """The model and task settings of a Garg et al. ``config.yaml``."""
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise GargConversionError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    model = config.get("model") or {}
    missing = [key for key in ("n_dims", "n_positions", "n_embd", "n_layer", "n_head") if key not in model]
    if missing:
        raise GargConversionError(
            f"{path} has no model.{', model.'.join(missing)}: not a Garg et al. config.yaml"
        )
    if model.get("family", "gpt2") != "gpt2":
        raise GargConversionError(
            f"{path}: model.family={model['family']!r}; only their gpt2 TransformerModel converts "
            f"(relu_attn changes the attention itself)"
        )
    training = config.get("training") or {}
    their_task = training.get("task", "linear_regression")
    task = TASK_NAMES.get(their_task, their_task)
    if task not in TASKS:
        raise GargConversionError(f"{path}: task {their_task!r} has no counterpart here ({', '.join(TASKS)})")
    kwargs = {TASK_KWARG_NAMES.get(k, k): v for k, v in (training.get("task_kwargs") or {}).items()}
    scale = kwargs.pop("scale", 1)
    if scale != 1:
        raise GargConversionError(f"{path}: task_kwargs scale={scale}; only scale 1 has a counterpart here")
    points = ((training.get("curriculum") or {}).get("points") or {}).get("end")
    return {
        **{key: int(model[key]) for key in ("n_dims", "n_positions", "n_embd", "n_layer", "n_head")},
        "task": task,
        "task_kwargs": kwargs,
        "train_n_points": int(points) if points is not None else None,
    }


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """Their model weights (from ``state.pt`` or a ``model_<step>.pt`` state dict) and the step."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise GargConversionError(f"cannot load {path}: {str(error).strip().splitlines()[0][:200]}") from None
    step = None
    if isinstance(state, dict) and "model_state_dict" in state:
        step = state.get("train_step")
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not any(str(k).startswith("_backbone.") for k in state):
        raise GargConversionError(
            f"{path} holds no TransformerModel weights (_read_in, _backbone, _read_out)"
        )
    return state, int(step) if step is not None else None


def garg_to_icl_config(settings: dict[str, Any], attn_implementation: str = "eager") -> ICLConfig:
    """An ``ICLConfig`` whose GPT-2 backbone is theirs: 2·n_positions positions, no dropout."""
    backbone = GPT2Config(
        n_positions=2 * settings["n_positions"],
        n_embd=settings["n_embd"],
        n_layer=settings["n_layer"],
        n_head=settings["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        vocab_size=1,
        bos_token_id=None,
        eos_token_id=None,
    )
    config = ICLConfig(
        n_dims=settings["n_dims"],
        n_positions=settings["n_positions"],
        n_embd=settings["n_embd"],
        n_layer=settings["n_layer"],
        n_head=settings["n_head"],
        task=settings["task"],
        task_kwargs=settings["task_kwargs"],
        backbone_config=backbone,
        attn_implementation=attn_implementation,  # PretrainedConfig sets it on the backbone's too
    )
    return config


def convert(state_path: str | Path, config_path: str | Path, attn_implementation: str = "eager") -> ICLModel:
    """An ``ICLModel`` with the weights of a Garg et al. checkpoint (predictions equal to theirs)."""
    settings = read_config(config_path)
    state, _ = read_state_dict(state_path)
    model = ICLModel(garg_to_icl_config(settings, attn_implementation))
    ours = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _BUFFER.search(key) or key == "_backbone.wte.weight":
            continue
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise GargConversionError(
                f"{state_path}: unexpected weight {key!r} (not _read_in/_backbone/_read_out)"
            )
        mapped[_PREFIXES[prefix] + key[len(prefix) :]] = value
    mapped["backbone.wte.weight"] = ours["backbone.wte.weight"]  # unused: the model reads inputs_embeds
    missing, unexpected = sorted(set(ours) - set(mapped)), sorted(set(mapped) - set(ours))
    if missing or unexpected:
        raise GargConversionError(
            f"{state_path} does not match config {config_path}: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for key, value in mapped.items():
        if value.shape != ours[key].shape:
            raise GargConversionError(
                f"{state_path}: {key} has shape {tuple(value.shape)}, the config gives {tuple(ours[key].shape)}; "
                f"pass the run's own config.yaml"
            )
    model.load_state_dict({key: value.to(ours[key].dtype) for key, value in mapped.items()}, strict=True)
    return model.eval()


def save_converted(
    state_path: str | Path,
    config_path: str | Path,
    output_dir: str | Path,
    attn_implementation: str = "eager",
) -> Path:
    """Convert and save an ``ICLModel`` folder (``config.json``, safetensors, ``README.md``)."""
    model = convert(state_path, config_path, attn_implementation)
    settings = read_config(config_path)
    _, step = read_state_dict(state_path)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    (output_dir / "README.md").write_text(_card(settings, state_path, step))
    return output_dir


def _card(settings: dict[str, Any], state_path: str | Path, step: int | None) -> str:
    kwargs = ", ".join(f"{k}={v}" for k, v in settings["task_kwargs"].items()) or "none"
    length = settings["train_n_points"]
    evaluate = "python -m icl_conml.evaluation --model THIS_FOLDER --output_dir OUT" + (
        f" --n_points {length}" if length else ""
    )
    return (
        "---\nlibrary_name: transformers\ntags:\n- in-context-learning\n- icl_conml\n- garg-et-al-2022\n---\n\n"
        "# A Garg et al. (2022) in-context learner, converted to icl_conml\n\n"
        f"Converted from `{Path(state_path).name}` (train step {step if step is not None else 'unknown'}) of "
        "[dtsip/in-context-learning](https://github.com/dtsip/in-context-learning) by "
        "`python -m icl_conml.convert_garg`; its predictions equal the original model's.\n\n"
        f"| task | `{settings['task']}` ({kwargs}) |\n|---|---|\n"
        f"| d | {settings['n_dims']} |\n| n_positions | {settings['n_positions']} |\n"
        f"| trained on prompts of | {length if length else 'unknown'} points |\n"
        f"| GPT-2 | n_embd {settings['n_embd']}, {settings['n_layer']} layers, {settings['n_head']} heads |\n\n"
        f"Evaluate (Garg et al. evaluate at their training length):\n\n```bash\n{evaluate}\n```\n"
    )


@entry_point
def main(argv: list[str]) -> int:
    """``python -m icl_conml.convert_garg STATE CONFIG OUT`` (``icl_conml convert-garg``)."""
    parser = OneLineParser(
        prog=command_name("python -m icl_conml.convert_garg", "icl_conml convert-garg"),
        description="Convert a Garg et al. (dtsip/in-context-learning) checkpoint into an ICLModel folder.",
    )
    parser.add_argument("state", help="their state.pt (or model_<step>.pt)")
    parser.add_argument("config", help="the run's config.yaml")
    parser.add_argument("output_dir", help="where the ICLModel folder goes")
    parser.add_argument(
        "--attn_implementation",
        default="eager",
        choices=("eager", "sdpa"),
        help="attention kernel (default eager)",
    )
    args = parser.parse_args(argv)
    out = save_converted(args.state, args.config, args.output_dir, args.attn_implementation)
    settings = read_config(args.config)
    length = f" --n_points {settings['train_n_points']}" if settings["train_n_points"] else ""
    print(
        f"wrote {out}; evaluate with: python -m icl_conml.evaluation --model {out} --output_dir OUT{length}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
