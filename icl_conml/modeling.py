"""ICLModel: read-in → transformer backbone (via ``inputs_embeds``) → read-out.

A prompt (x_1, y_1, …, x_n, y_n) becomes 2n tokens [x_1, (y_1, 0…), x_2, …] (Garg et al.
2022); the prediction for y_i is the read-out at the token of x_i, which sees x_i and the
pairs before it. Extra tokens (ConML probes and views, see ``conml.py``) can be appended
after the context with their own position ids and visibility; the context tokens' outputs
do not change, because they never attend to appended tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, GPT2Config, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput, find_adapter_config_file

from .conml import LayoutStructure, attention_plan, interleave
from .errors import UserError
from .gelu import use_exact_new_gelu
from .tasks import FunctionClass, get_task

#: ``from_pretrained`` arguments that locate files (used to look for a LoRA run's adapter config).
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "subfolder")


#: Whether the model being built may import the task its config names by import path: only
#: while ``from_pretrained(..., trust_remote_code=True)`` (or ``trusting_remote_code(True)``) runs.
_TRUST_REMOTE_CODE: ContextVar[bool] = ContextVar("icl_conml_trust_remote_code", default=False)


@contextmanager
def trusting_remote_code(trust: bool) -> Iterator[None]:
    """Within it, an ``ICLModel`` whose config names its task by an import path not yet known to
    this process imports that module when ``trust`` is True (transformers' ``trust_remote_code``);
    otherwise it is refused (``registry.RemoteCodeError``) before anything is imported."""
    token = _TRUST_REMOTE_CODE.set(bool(trust))
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE.reset(token)


class LoRARunError(UserError, ValueError):
    """``ICLModel.from_pretrained`` was given a LoRA run: one line naming the calls that load it."""


class ICLConfig(PretrainedConfig):
    """Configuration of an in-context learner.

    Args:
        n_dims: width d of the inputs x.
        n_positions: the most (x, y) pairs a prompt may hold.
        n_embd, n_layer, n_head: size of the default GPT-2 backbone (ignored when
            ``backbone_config`` is given).
        dropout, activation_function: the default GPT-2 backbone's dropout and MLP activation
            (``gelu_new``, GPT-2's; ignored when ``backbone_config`` is given).
        task, task_kwargs: the function class the model is trained on (evaluation defaults).
        backbone_config: any ``transformers`` config whose ``AutoModel`` accepts
            ``inputs_embeds``; default a fresh GPT-2 with dropout 0 and no KV cache.
        backbone_name_or_path: where the backbone's pretrained weights came from, if any.
        attn_implementation: (``PretrainedConfig``'s keyword) the attention kernel, set on the
            backbone's config too.
    """

    model_type = "icl_conml"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        n_dims: int = 20,
        n_positions: int = 41,
        n_embd: int = 256,
        n_layer: int = 12,
        n_head: int = 8,
        task: str = "linear_regression",
        task_kwargs: dict[str, Any] | None = None,
        backbone_config: PretrainedConfig | dict | None = None,
        backbone_name_or_path: str | None = None,
        dropout: float = 0.0,
        activation_function: str = "gelu_new",
        **kwargs,
    ) -> None:
        self.n_dims = n_dims
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.task = task
        self.task_kwargs = dict(task_kwargs or {})
        self.backbone_name_or_path = backbone_name_or_path
        self.dropout = dropout
        self.activation_function = activation_function
        if isinstance(backbone_config, dict):
            backbone_config = dict(backbone_config)
            backbone_config = AutoConfig.for_model(backbone_config.pop("model_type"), **backbone_config)
        if backbone_config is None:
            backbone_config = GPT2Config(
                n_positions=2 * n_positions + 1,  # 2n context tokens + a probe at position 2n
                n_embd=n_embd,
                n_layer=n_layer,
                n_head=n_head,
                resid_pdrop=dropout,
                embd_pdrop=dropout,
                attn_pdrop=dropout,
                activation_function=activation_function,
                use_cache=False,
                vocab_size=1,
                bos_token_id=None,
                eos_token_id=None,
            )
        self.backbone_config = backbone_config
        super().__init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size


@dataclass
class ICLOutput(ModelOutput):
    """``predictions`` (B, n): the prediction for y_i made from the pairs before it and x_i.

    ``appended_outputs`` (B, P) and ``appended_hidden`` (B, P, E) are the read-out and last
    hidden state at appended tokens (ConML probes), when any were given.
    """

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    appended_outputs: torch.Tensor | None = None
    appended_hidden: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class ICLPreTrainedModel(PreTrainedModel):
    config_class = ICLConfig
    base_model_prefix = "icl"
    main_input_name = "xs"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # Flash kernels serve plain ICL only: they take no arbitrary mask, so ``forward`` refuses
    # appended (ConML probe) tokens under them rather than let the mask be dropped.
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # Read-in/out keep PyTorch's default Linear init, as in Garg et al.: a 0.02-std read-in
        # shrinks the inputs tenfold against the position embeddings and slows learning.
        if module is getattr(self, "read_in", None) or module is getattr(self, "read_out", None):
            module.reset_parameters()


class ICLModel(ICLPreTrainedModel):
    """In-context learner for (x, y) prompts; see the module docstring."""

    def __init__(
        self,
        config: ICLConfig,
        backbone: PreTrainedModel | None = None,
        task_class: FunctionClass | None = None,
    ) -> None:
        super().__init__(config)
        self.read_in = nn.Linear(config.n_dims, config.hidden_size)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.backbone_config)
        self.read_out = nn.Linear(config.hidden_size, 1)
        # The function class gives the training loss: the recipe's (passed in), else built once here.
        # A config is data: its import path is imported only under trust_remote_code (or when this
        # process already knows it: a registered class, or the one the user's recipe named).
        if task_class is None:
            task_class = get_task(
                config.task, config.n_dims, allow_import=_TRUST_REMOTE_CODE.get(), **config.task_kwargs
            )
        self.task_class = task_class
        use_exact_new_gelu(self.backbone)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained``: a full model (folder or Hub id), nothing else.

        A LoRA run (``adapter_config.json`` next to ``config.json``; also what ``AutoModel``
        finds there) is refused with a ``LoRARunError`` naming ``icl_conml.lora.load_lora_model``
        and ``icl_conml.lora.merge``, the calls that load it onto its pretrained backbone.
        A task named by import path in ``config.json`` is imported only with
        ``trust_remote_code=True`` (which ``AutoModel.from_pretrained`` passes on).
        """
        adapter = (kwargs.get("adapter_kwargs") or {}).get("_adapter_model_path")
        if adapter is None and pretrained_model_name_or_path is not None:
            hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if kwargs.get(key) is not None}
            if find_adapter_config_file(str(pretrained_model_name_or_path), **hub_kwargs) is not None:
                adapter = pretrained_model_name_or_path
        if adapter is not None:
            raise LoRARunError(
                f"{adapter} is a LoRA run (adapter_config.json), not a full ICLModel: load it with "
                f"icl_conml.lora.load_lora_model({str(adapter)!r}) (the peft model) or "
                f"icl_conml.lora.merge({str(adapter)!r}) (a plain ICLModel)"
            )
        with trusting_remote_code(kwargs.get("trust_remote_code") is True):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def from_pretrained_backbone(
        cls,
        backbone_name_or_path: str,
        attn_implementation: str = "sdpa",
        task_class: FunctionClass | None = None,
        **config_kwargs,
    ) -> ICLModel:
        """A new learner (fresh read-in/read-out) around a pretrained ``AutoModel`` backbone.

        The hidden size comes from the backbone's config; ``config_kwargs`` are the other
        ``ICLConfig`` fields (n_dims, n_positions, task, ...), ``task_class`` the function class
        they name if the caller holds it already. Weights load in float32 (the Trainer's mixed
        precision casts on the fly).
        """
        backbone = AutoModel.from_pretrained(
            backbone_name_or_path, dtype=torch.float32, attn_implementation=attn_implementation
        )
        backbone_config = backbone.config
        config = cls.config_class(
            n_embd=backbone_config.hidden_size,
            n_layer=backbone_config.num_hidden_layers,
            n_head=backbone_config.num_attention_heads,
            backbone_config=backbone_config,
            backbone_name_or_path=backbone_name_or_path,
            # Also the nested config's: without it, building ICLConfig would reset the backbone's
            # kernel to None, after which it silently ignores our 4D masks.
            attn_implementation=attn_implementation,
            **config_kwargs,
        )
        return cls(config, backbone=backbone, task_class=task_class)

    def get_input_embeddings(self) -> nn.Module:
        return self.read_in

    def forward(
        self,
        xs: torch.Tensor,
        ys: torch.Tensor | None = None,
        appended_tokens: torch.Tensor | None = None,
        appended_layout: LayoutStructure | None = None,
        appended_position_ids: torch.Tensor | None = None,
        appended_visible: torch.Tensor | None = None,
        appended_rows: tuple[int, int] | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> ICLOutput:
        """Predict y at every query position; with ``ys``, also the class's training loss.

        xs (B, n, d); ys (B, n) (optional: the prediction for y_i never uses ys[i:]).
        ``appended_tokens`` are extra tokens, laid out by ``appended_layout`` (a
        ``conml.LayoutStructure``, whose attention plan is cached: ``ProbeLayout.model_inputs()``
        passes both) or by ``appended_position_ids``, ``appended_visible`` and ``appended_rows``
        (the same fields, given by hand: the plan is built on every call). With
        ``appended_rows = (offset, length)`` the appended tokens from ``offset`` on are K
        independent sequences of ``length`` tokens per task: they run as B·K extra batch rows,
        in the same backbone call as the main rows when both have the same length and structure
        (shuffled views), else in a second call; ``appended_outputs``/``appended_hidden`` are
        returned in the order of ``appended_tokens`` either way.
        """
        dtype = self.read_in.weight.dtype
        batch, n_points, _ = xs.shape
        if appended_tokens is not None:
            check_mask_support(self.backbone.config._attn_implementation)
        labels = ys if ys is not None else xs.new_zeros(batch, n_points)
        context = interleave(xs.to(dtype), labels.to(dtype))
        tokens, position_ids, mask, rows, plan = context, None, None, None, None
        if appended_tokens is not None:
            layout = appended_layout
            if layout is not None:
                appended_position_ids, appended_visible, appended_rows = (
                    layout.position_ids,
                    layout.visible,
                    layout.rows,
                )
            # Eager: the layout's cached plan. Under torch.compile the plain layout is traced into
            # the graph instead (tensor ops only); views in rows take one graph break for their plan.
            if layout is not None and not (appended_rows is None and torch.compiler.is_compiling()):
                plan = layout.attention_plan(dtype)
            else:
                plan = attention_plan(
                    context.shape[1], appended_position_ids, appended_visible, appended_rows, dtype
                )
            appended_tokens = appended_tokens.to(dtype)
            if appended_rows is not None:  # the views: (B, K·length, d) -> (B·K, length, d)
                offset, length = appended_rows
                rows = appended_tokens[:, offset:].reshape(-1, length, appended_tokens.shape[-1])
                appended_tokens = appended_tokens[:, :offset]
            tokens = torch.cat([context, appended_tokens], dim=1)
            joined = rows is not None and plan.joined
            if joined:  # one backbone call over B + B·K rows
                tokens, rows = torch.cat([tokens, rows]), None
            position_ids, mask = plan.main.inputs(tokens.shape[0])

        backbone_out = self._run_backbone(tokens, mask, position_ids, output_hidden_states)
        hidden = backbone_out.last_hidden_state
        hidden_states = backbone_out.hidden_states if output_hidden_states else None
        row_hidden = None
        if hidden.shape[0] > batch:  # joined view rows
            hidden, row_hidden = hidden[:batch], hidden[batch:]
            if hidden_states is not None:
                hidden_states = tuple(state[:batch] for state in hidden_states)
        elif rows is not None:  # view rows of another length or structure: their own call
            row_positions, row_mask = plan.rows.inputs(rows.shape[0])
            row_hidden = self._run_backbone(rows, row_mask, row_positions).last_hidden_state
        predictions = self.read_out(hidden[:, 0 : 2 * n_points : 2]).squeeze(-1)

        loss = None
        if ys is not None:
            loss = self.task_class.loss(predictions.float(), ys.float()).mean()
        out = ICLOutput(loss=loss, predictions=predictions)
        if appended_tokens is not None:
            out.appended_hidden = hidden[:, 2 * n_points :]
            if row_hidden is not None:  # back into the appended tokens' order
                views = row_hidden.reshape(batch, -1, row_hidden.shape[-1])
                out.appended_hidden = torch.cat([out.appended_hidden, views], dim=1)
            out.appended_outputs = self.read_out(out.appended_hidden).squeeze(-1)
        if output_hidden_states:
            out.hidden_states = hidden_states
        return out if return_dict else out.to_tuple()

    def _run_backbone(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """One backbone pass over read-in tokens (B, L, d) with an optional 4D additive mask."""
        return self.backbone(
            inputs_embeds=self.read_in(tokens),
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=output_hidden_states,
        )


#: Attention kernels that apply an arbitrary 4D additive mask, checked against running each
#: view as its own sequence (tests/test_attention_kernels.py). Flash kernels take none (a 4D mask
#: would be read as padding); flex_attention aborts the process on CPU with such a mask (torch
#: 2.13); paged kernels ignore it. Those serve plain ICL (no appended tokens) only.
MASK_KERNELS = ("eager", "sdpa")


def check_mask_support(attn_implementation: str | None) -> None:
    """Raise if the backbone's attention kernel would not apply the appended tokens' 4D mask."""
    if attn_implementation not in MASK_KERNELS:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} cannot apply the 4D attention mask of appended "
            f"(ConML probe) tokens; use attn_implementation='sdpa' (or 'eager'), or train without ConML "
            f"(conml_lambda=0)"
        )


AutoConfig.register(ICLConfig.model_type, ICLConfig)
AutoModel.register(ICLConfig, ICLModel)
