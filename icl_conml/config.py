"""Recipe sections as dataclasses, parsed from YAML + command line, validated up front.

A recipe is one flat YAML mapping whose keys are the fields below and the standard
``transformers.TrainingArguments`` names; any key may be overridden on the command line
(``--key value``). Defaults are the built-in quickstart: a CPU-sized linear-regression run.
Every user error raises ``RecipeError`` with one line naming the key, the value and what is
allowed, before any model is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import json
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser, TrainingArguments

from . import conml
from .errors import UserError
from .tasks import TASK_REGISTRY, FunctionClass, get_task, hyperparameter_names, resolve_task_class


class RecipeError(UserError, ValueError):
    """A user error in a recipe or on the command line: one line, no traceback needed (exit 2)."""


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RecipeError(message)


def _choice(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{key}={value!r} is not allowed{hint}; choose one of: {', '.join(allowed)}")


#: Attention kernels a recipe may name; the flash kernels take no attention mask (plain ICL only).
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"]
ATTN_IMPLEMENTATIONS: tuple[str, ...] = typing.get_args(AttnImplementation)


@dataclass
class ModelArguments:
    """The in-context learner: read-in → backbone → read-out."""

    _argument_group_name = "model"  # a section of --help (HfArgumentParser)

    n_embd: int = _help("Hidden width of the default GPT-2 backbone.", default=64)
    n_layer: int = _help("Number of layers of the default GPT-2 backbone.", default=4)
    n_head: int = _help("Attention heads of the default GPT-2 backbone (must divide n_embd).", default=4)
    n_positions: int | None = _help(
        "Most (x, y) pairs a prompt may hold (default: n_points, or the curriculum's end).", default=None
    )
    dropout: float = _help("Dropout of the backbone (0 by default, as in Garg et al.).", default=0.0)
    attn_implementation: AttnImplementation = _help(
        "Attention kernel of the backbone: eager (default: the faster one for small models on CPU, where the "
        "ConML probe mask costs sdpa its causal fast path) or sdpa (faster for larger models; Garg recipes use it); "
        "flash_attention_2/3 on a GPU in bf16 for plain ICL only (they take no mask, ConML needs one).",
        default="eager",
    )
    backbone_name_or_path: str | None = _help(
        "Pretrained backbone (Hub id or folder; any AutoModel taking inputs_embeds, e.g. gpt2); "
        "default: a fresh GPT-2 of n_embd/n_layer/n_head.",
        default=None,
    )
    freeze_backbone: bool = _help(
        "Keep the backbone's own weights fixed (read-in/read-out always train); implied by LoRA.",
        default=False,
    )
    lora_r: int = _help("LoRA rank on the backbone (peft); 0 = no LoRA.", default=0)
    lora_alpha: int = _help("LoRA scaling alpha (the update is scaled by alpha / r).", default=16)
    lora_dropout: float = _help("Dropout on the LoRA branch.", default=0.0)
    lora_target_modules: list[str] | None = _help(
        "Backbone modules that get adapters (default: peft's choice for the architecture, "
        "e.g. c_attn for GPT-2, q_proj/v_proj for Llama).",
        default=None,
    )

    def __post_init__(self) -> None:
        _require(self.lora_r >= 0, f"lora_r={self.lora_r} must be >= 0 (0 = no LoRA)")
        _require(self.lora_alpha > 0, f"lora_alpha={self.lora_alpha} must be > 0")
        _require(0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        _require(
            self.lora_target_modules is None or self.lora_r > 0,
            f"lora_target_modules={self.lora_target_modules} is set but lora_r=0 (LoRA off); set lora_r > 0",
        )
        for key in ("n_embd", "n_layer", "n_head"):
            _require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        _require(
            self.n_embd % self.n_head == 0,
            f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick n_head dividing n_embd",
        )
        _require(0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)")
        _choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)


@dataclass
class TaskArguments:
    """The function class that prompts are drawn from, and the curriculum."""

    _argument_group_name = "task"

    task: str = _help(
        f"Function class: one of {', '.join(TASK_REGISTRY)}, or your own as 'package.module:ClassName' "
        f"(a FunctionClass subclass; see docs/extending.md).",
        default="linear_regression",
    )
    n_dims: int = _help("Input dimension d.", default=5)
    n_points: int = _help("(x, y) pairs per prompt.", default=11)
    task_kwargs: dict[str, Any] | str | None = _help(
        'Hyper-parameters of the function class as a mapping (YAML) or JSON, e.g. {"sparsity": 2}; '
        "the class's dataclass fields give the defaults. Built-in ones also have the flat keys below.",
        default=None,
    )
    sparsity: int | None = _help(
        "sparse_linear_regression: non-zero coordinates of w (class default 3).", default=None
    )
    noise_std: float | None = _help(
        "noisy_linear_regression: label noise std (class default 0.5).", default=None
    )
    hidden_size: int | None = _help(
        "relu_2nn: hidden width of the target network (class default 100).", default=None
    )
    depth: int | None = _help("decision_tree: depth of the target tree (class default 4).", default=None)
    task_pool_size: int = _help(
        "Draw each prompt's function from a fixed pool of this many functions; 0 = a fresh function every time.",
        default=0,
    )
    curriculum_dims_start: int | None = _help(
        "Curriculum: dimensions at step 0 (default: no curriculum).", default=None
    )
    curriculum_dims_inc: int = _help("Curriculum: dimensions added every interval.", default=1)
    curriculum_dims_interval: int = _help("Curriculum: steps between dimension increments.", default=2000)
    curriculum_points_start: int | None = _help(
        "Curriculum: points at step 0 (default: no curriculum).", default=None
    )
    curriculum_points_inc: int = _help("Curriculum: points added every interval.", default=2)
    curriculum_points_interval: int = _help("Curriculum: steps between point increments.", default=2000)
    eval_n_prompts: int = _help("Fixed prompts for eval_loss during training (0: no eval set).", default=256)
    eval_seed: int = _help(
        "Seed of the eval_n_prompts evaluation prompts, independent of the training seed so that every run "
        "of a study is evaluated on the same prompts.",
        default=0,
    )
    eval_set: str | None = _help(
        "A fixed evaluation set (folder or Hub REPO[:CONFIG] written by data_scripts/make_eval_sets.py) to "
        "evaluate on during training instead of eval_n_prompts sampled prompts.",
        default=None,
    )

    def __post_init__(self) -> None:
        if self.task not in TASK_REGISTRY and ":" not in self.task:
            _choice("task", self.task, tuple(TASK_REGISTRY))  # a typo of a built-in: suggest one
        _require(self.n_dims >= 1, f"n_dims={self.n_dims} must be >= 1")
        _require(self.n_points >= 1, f"n_points={self.n_points} must be >= 1")
        self.task_kwargs = self._task_kwargs_mapping()
        try:  # the class validates its own hyper-parameters; build it once here to report them early
            self.function_class()
        except (ValueError, TypeError) as error:
            raise RecipeError(str(error).splitlines()[0]) from None
        _require(self.task_pool_size >= 0, f"task_pool_size={self.task_pool_size} must be >= 0 (0 = no pool)")
        _require(self.eval_n_prompts >= 0, f"eval_n_prompts={self.eval_n_prompts} must be >= 0")
        _require(self.eval_seed >= 0, f"eval_seed={self.eval_seed} must be >= 0")
        for name, end in (("dims", self.n_dims), ("points", self.n_points)):
            start = getattr(self, f"curriculum_{name}_start")
            if start is None:
                continue
            _require(start >= 1, f"curriculum_{name}_start={start} must be >= 1")
            _require(
                end >= start,
                f"curriculum end below start: n_{name}={end} < curriculum_{name}_start={start}; "
                f"the curriculum grows from its start up to n_{name}",
            )
            _require(getattr(self, f"curriculum_{name}_inc") >= 1, f"curriculum_{name}_inc must be >= 1")
            _require(
                getattr(self, f"curriculum_{name}_interval") >= 1, f"curriculum_{name}_interval must be >= 1"
            )

    def _task_kwargs_mapping(self) -> dict[str, Any]:
        """``task_kwargs`` as a dict (it may come as JSON from the command line), flat keys merged in."""
        mapping = self.task_kwargs
        if isinstance(mapping, str):
            try:
                mapping = json.loads(mapping)
            except ValueError:
                raise RecipeError(
                    f"task_kwargs={mapping!r} is not JSON; e.g. '{{\"sparsity\": 2}}'"
                ) from None
        _require(mapping is None or isinstance(mapping, dict), f"task_kwargs={mapping!r} must be a mapping")
        mapping = dict(mapping or {})
        try:
            accepted = hyperparameter_names(resolve_task_class(self.task))
        except ValueError as error:
            raise RecipeError(str(error).splitlines()[0]) from None
        unknown = sorted(set(mapping) - set(accepted))
        _require(
            not unknown,
            f"task_kwargs has {unknown} but {self.task} takes {', '.join(accepted) or 'no hyper-parameters'}",
        )
        for key in FLAT_TASK_KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            _require(
                key in accepted,
                f"{key}={value!r} is not a hyper-parameter of task {self.task} (it takes "
                f"{', '.join(accepted) or 'none'}); drop it or pick the task it belongs to",
            )
            if mapping.get(key, value) != value:
                raise RecipeError(
                    f"{key} is given twice ({key}={value!r} and task_kwargs {key}={mapping[key]!r}); keep one"
                )
            mapping[key] = value
        return mapping

    def function_class(self) -> FunctionClass:
        """The function class this section describes (defaults from the class itself)."""
        return get_task(self.task, self.n_dims, **self.task_kwargs)

    def hyperparameters(self) -> dict[str, Any]:
        """Every hyper-parameter of the function class, defaults included (recorded in the model config)."""
        return self.function_class().hyperparameters()


# The built-in classes' hyper-parameters that also have a flat recipe key (``sparsity: 2``).
FLAT_TASK_KEYS = ("sparsity", "noise_std", "hidden_size", "depth")


@dataclass
class ConMLArguments:
    """The ConML contrastive meta-objective (see icl_conml/conml.py).

    The fixed choices are ``Literal`` types (``--help`` lists them, the parser checks them); views
    and distances are registries that a user extends (``conml.register_view``/``register_distance``),
    so they are names checked against the registry when the recipe is built.
    """

    _argument_group_name = "ConML"

    conml_lambda: float = _help("Weight λ of the ConML term; 0 = plain ICL training.", default=0.02)
    conml_lambda_start: int = _help(
        "Steps trained with λ = 0 before the ConML term starts (e.g. to let plain ICL leave the loss plateau).",
        default=0,
    )
    conml_lambda_warmup: int = _help(
        "Steps over which λ then rises linearly from 0 to conml_lambda (0: at once).", default=0
    )
    conml_representation: conml.Representation = _help(
        "What a probe reads: the model's prediction at the probe (paper) or its last hidden state.",
        default="probe_output",
    )
    conml_num_probes: int = _help("Probes M per step (M > 1 gives a vector representation).", default=1)
    conml_views: str = _help(
        f"View sampler, a registered name: {' | '.join(conml.VIEWS)} (conml.register_view adds one).",
        default="prefix_half",
    )
    conml_num_views: int = _help("Views K per task.", default=1)
    conml_subset_min: float = _help(
        "Smallest view, as a fraction of the context (subset views).", default=0.5
    )
    conml_subset_max: float = _help("Largest view, as a fraction of the context (subset views).", default=0.5)
    conml_distance: str = _help(
        f"Distance φ, a registered name: {' | '.join(conml.DISTANCES)} (conml.register_distance adds one).",
        default="sigmoid_sq",
    )
    conml_loss: conml.Loss = _help(
        "Loss form: difference (paper: λ·(d_in − d_out)) or infonce.", default="difference"
    )
    conml_temperature: float = _help("Temperature of the infonce form.", default=0.1)
    conml_terms: conml.Terms = _help(
        "Which terms of the difference form (ablation): both, in (d_in only) or out (−d_out only).",
        default="both",
    )
    conml_prefix_mode: conml.PrefixMode = _help(
        "How prefix views are computed: probe_mask (probe tokens in the main sequence) or extra_sequence.",
        default="probe_mask",
    )

    def __post_init__(self) -> None:
        _require(self.conml_lambda >= 0, f"conml_lambda={self.conml_lambda} must be >= 0 (0 = plain ICL)")
        _choice("conml_representation", self.conml_representation, conml.REPRESENTATIONS)
        _choice("conml_views", self.conml_views, conml.VIEWS)
        _choice("conml_distance", self.conml_distance, conml.DISTANCES)
        _choice("conml_loss", self.conml_loss, conml.LOSSES)
        _choice("conml_terms", self.conml_terms, conml.TERMS)
        _choice("conml_prefix_mode", self.conml_prefix_mode, conml.PREFIX_MODES)
        _require(self.conml_lambda_start >= 0, f"conml_lambda_start={self.conml_lambda_start} must be >= 0")
        _require(
            self.conml_lambda_warmup >= 0, f"conml_lambda_warmup={self.conml_lambda_warmup} must be >= 0"
        )
        _require(self.conml_num_probes >= 1, f"conml_num_probes={self.conml_num_probes} must be >= 1")
        _require(self.conml_num_views >= 1, f"conml_num_views (K)={self.conml_num_views} must be >= 1")
        _require(
            0 < self.conml_subset_min <= self.conml_subset_max <= 1,
            f"view subset bounds must satisfy 0 < conml_subset_min <= conml_subset_max <= 1 "
            f"(got {self.conml_subset_min}, {self.conml_subset_max}); they are fractions of the context",
        )
        _require(self.conml_temperature > 0, f"conml_temperature={self.conml_temperature} must be > 0")
        _require(
            self.conml_loss == "difference" or self.conml_terms == "both",
            f"conml_terms={self.conml_terms!r} is an ablation of the difference form; use conml_loss=difference",
        )

    @property
    def enabled(self) -> bool:
        return self.conml_lambda > 0

    def lambda_at(self, step: int) -> float:
        """λ at optimizer step ``step``: 0 before ``conml_lambda_start``, then a linear warm-up."""
        if step < self.conml_lambda_start:
            return 0.0
        if self.conml_lambda_warmup == 0:
            return self.conml_lambda
        return self.conml_lambda * min(1.0, (step - self.conml_lambda_start + 1) / self.conml_lambda_warmup)


@dataclass
class ICLTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with defaults for in-context meta-training (the quickstart)."""

    _argument_group_name = "training (transformers.TrainingArguments; defaults: the quickstart)"

    output_dir: str | None = _help("Where checkpoints and the final model go.", default="outputs/quickstart")
    max_steps: int = _help("Optimisation steps (prompts are generated on the fly).", default=8000)
    per_device_train_batch_size: int = _help("Prompts per process per micro-batch.", default=64)
    per_device_eval_batch_size: int = _help("Prompts per process per evaluation batch.", default=256)
    learning_rate: float = _help("Adam learning rate.", default=1e-3)
    warmup_steps: float = _help("Linear warm-up steps.", default=200)
    lr_scheduler_type: str = _help("Learning-rate schedule.", default="cosine")
    logging_steps: float = _help("Log every this many steps.", default=100)
    save_steps: float = _help("Checkpoint every this many steps.", default=2000)
    save_total_limit: int | None = _help("Keep at most this many checkpoints.", default=2)
    remove_unused_columns: bool = _help("Keep custom batch keys (xs, ys, probes).", default=False)
    label_names: list[str] | None = _help(
        "Batch keys holding labels (gives eval_loss).", default_factory=lambda: ["ys"]
    )
    dataloader_pin_memory: bool = _help("Pin memory (prompts are generated in-process).", default=False)
    overwrite_output_dir: bool = _help(
        "Train into an output_dir that already holds a run, deleting its checkpoint-N folders.", default=False
    )
    resume_from_checkpoint: str | None = _help(
        "Continue a run: a checkpoint-N folder, 'latest' (also 'true') for the newest intact checkpoint in "
        "output_dir, or 'auto' (latest if output_dir holds a checkpoint, else start the run: for requeues).",
        default=None,
    )
    resume_weights_only: bool = _help(
        "Resume from a checkpoint's weights only: a fresh optimizer (Adam moments reset), the schedule moved to "
        "the checkpoint's step. For a checkpoint whose optimizer.pt/scheduler.pt is missing or damaged.",
        default=False,
    )
    resume_extend_schedule: bool = _help(
        "Allow a resume with another max_steps under a decaying lr_scheduler_type (linear, cosine, ...): the "
        "schedule is re-planned over the new max_steps from the checkpoint's step (the learning rate jumps).",
        default=False,
    )

    def __post_init__(self) -> None:
        from .extras import is_available, message

        # TrainingArguments would fail on a DeepSpeed config without deepspeed with a TypeError.
        _require(
            not self.deepspeed or is_available("deepspeed"),
            message("deepspeed", f"deepspeed={self.deepspeed!r}"),
        )
        if not self.use_cpu and not _accelerator_available():
            # No GPU: pick the CPU without being told, also under a multi-process launcher.
            # accelerate forms the gloo process group only for use_cpu (else every process
            # would silently train alone); DeepSpeed instead needs use_cpu off (accelerate
            # drops DeepSpeed when cpu=True) and an explicit gloo backend.
            if self.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
                self.ddp_backend = self.ddp_backend or "gloo"
            else:
                self.use_cpu = True
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        """``TrainingArguments.to_dict()`` plus the task, model and ConML keys, version and git commit
        that ``tracking.attach`` stored: every ``report_to`` backend records this dict as the run's config."""
        return {**getattr(self, "tracked_settings", {}), **super().to_dict()}


def _accelerator_available() -> bool:
    """Whether torch sees a GPU (or another accelerator: MPS, XPU, ...)."""
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


SECTIONS = (ModelArguments, TaskArguments, ConMLArguments, ICLTrainingArguments)


@dataclass
class Recipe:
    model: ModelArguments
    task: TaskArguments
    conml: ConMLArguments
    training: ICLTrainingArguments
    raw: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe, defaults included: every key of the model, task and ConML sections,
        the training keys that define or steer the run (``TRAINING_RECIPE_KEYS``), and any other
        key the recipe or command line set; values as plain YAML data.

        Saved as ``recipe.yaml`` (loading it back gives the same dict), recorded for each run
        segment in ``run_history.jsonl`` (what a resume is compared with) and by every tracker.
        """
        out: dict[str, Any] = {}
        for section in (self.model, self.task, self.conml):
            out.update(dataclasses.asdict(section))
        for key in TRAINING_RECIPE_KEYS:
            out[key] = _plain(getattr(self.training, key))
        # Run control is not part of the recipe: re-running a saved recipe must not overwrite or resume.
        out.update(
            {
                key: _plain(value)
                for key, value in self.raw.items()
                if key not in RUN_CONTROL_KEYS and key not in out
            }
        )
        return out


#: ``TrainingArguments`` fields saved in every recipe: those that define the experiment (batch,
#: optimiser, schedule, seeds, precision) and those that steer the run (length, output, logging,
#: saving, evaluation, reporting).
TRAINING_RECIPE_KEYS = (
    "output_dir",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "optim",
    "optim_args",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "seed",
    "data_seed",
    "bf16",
    "fp16",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "eval_strategy",
    "eval_steps",
    "per_device_eval_batch_size",
    "report_to",
)


def _plain(value: Any) -> Any:
    """A value as plain YAML data (enums become their string value)."""
    return value.value if isinstance(value, enum.Enum) else value


RUN_CONTROL_KEYS = (
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "resume_weights_only",
    "resume_extend_schedule",
)


def known_keys() -> list[str]:
    return [f.name for section in SECTIONS for f in dataclasses.fields(section) if f.init]


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else "; run with --help to list every key"


def _field_types() -> dict[str, Any]:
    types_by_key: dict[str, Any] = {}
    for section in SECTIONS:
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            types_by_key.setdefault(f.name, hints.get(f.name))
    return types_by_key


def _check_type(key: str, value: Any, expected: Any) -> None:
    """YAML values bypass argparse's type conversion: check simple scalar types here."""
    if value is None or expected is None:
        return
    options = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    options = tuple(typing.get_origin(o) or o for o in options if o is not type(None))
    if any(o in (Any, typing.Any) or not isinstance(o, type) for o in options):
        return
    ok = any(isinstance(value, o) and not (o is int and isinstance(value, bool)) for o in options)
    if float in options and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join(o.__name__ for o in options)
        raise RecipeError(f"{key}={_short(value)} has type {type(value).__name__}; expected {names}")


def _recipe_path(name: str) -> Path:
    """A recipe's path, or a packaged recipe by name (``linear_regression``; see ``resources``)."""
    from .resources import ResourceNotFound, resolve

    try:
        return resolve(name)
    except ResourceNotFound:
        return Path(name)  # load_yaml reports it missing


#: A recipe is a few hundred bytes of ``key: value`` lines; these bounds only stop accidents.
MAX_RECIPE_BYTES = 1_000_000
MAX_VALUE_ITEMS = 1_000
MAX_VALUE_CHARS = 10_000


class _RecipeYAMLError(Exception):
    """A recipe-specific YAML problem (line known), reported by ``load_yaml`` with the file name."""


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing what a recipe never needs and what hides mistakes: anchors and
    aliases (a few lines of nested aliases expand to gigabytes) and duplicate keys (YAML silently
    keeps the last one)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            kind = (
                f"alias *{event.anchor}" if isinstance(event, yaml.AliasEvent) else f"anchor &{event.anchor}"
            )
            raise _RecipeYAMLError(
                f"uses the YAML {kind} (line {event.start_mark.line + 1}); recipes take no anchors or aliases: "
                f"write each value out"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _RecipeYAMLError(f"sets {key!r} twice (lines {seen[key]} and {line}); keep one")
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            seen[key] = line
        return super().construct_mapping(node, deep)


def _read_recipe(path: Path) -> Any:
    """The parsed YAML of a recipe file, or ``RecipeError`` (one line) for a file that is not one."""
    name = str(path)
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"recipe {name!r} is {size:,} bytes; a recipe is a short list of key: value lines (at most "
            f"{MAX_RECIPE_BYTES:,} bytes): is this the right file?"
        )
    raw = path.read_bytes()
    try:
        if b"\x00" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {name!r} is not a text file (UTF-8 YAML); pass a YAML recipe") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except _RecipeYAMLError as error:
        raise RecipeError(f"recipe {name!r} {error}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {name!r} is not valid YAML: {str(error).splitlines()[0]}") from None
    if data is None:
        raise RecipeError(
            f"recipe {name!r} is empty; write key: value lines (see recipes/), or give no recipe to run the "
            f"quickstart"
        )
    return data


def _check_size(key: str, value: Any, depth: int = 0) -> None:
    """Refuse a value far larger than any recipe key takes (a list of a million modules...)."""
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        raise RecipeError(f"{key} is a string of {len(value):,} characters (at most {MAX_VALUE_CHARS:,})")
    if isinstance(value, (list, dict)):
        if len(value) > MAX_VALUE_ITEMS or depth > 4:
            what = (
                f"{len(value):,} items" if len(value) > MAX_VALUE_ITEMS else "values nested more than 4 deep"
            )
            raise RecipeError(
                f"{key} holds {what}; a recipe value is at most {MAX_VALUE_ITEMS:,} items, 4 deep"
            )
        for item in value.values() if isinstance(value, dict) else value:
            _check_size(key, item, depth + 1)


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (error messages stay one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"recipe file {str(path)!r} not found; pass the path of a YAML recipe (see recipes/)"
        )
    data = _read_recipe(path)
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a mapping of key: value, got {type(data).__name__}")
    for key, value in data.items():
        try:
            _check_size(str(key), value)
        except RecipeError as error:
            raise RecipeError(f"recipe {str(path)!r}: {error}") from None
    expected = _field_types()
    for key, value in data.items():
        if key not in expected:
            raise RecipeError(f"unknown recipe key {key!r} in {path}{_suggest(str(key))}")
        if key == "resume_from_checkpoint" and isinstance(value, bool):  # `resume_from_checkpoint: true`
            value = data[key] = "latest" if value else None
        if isinstance(value, str) and float in _options(expected[key]):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                value = data[key] = float(value)
            except ValueError:
                pass
        _check_type(key, value, expected[key])
    return data


def _options(hint: Any) -> tuple[Any, ...]:
    is_union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return typing.get_args(hint) if is_union else (hint,)


def _enum_choices() -> dict[str, list[str]]:
    """Keys whose value must be one of fixed values, with the values: an Enum's (e.g.
    lr_scheduler_type) or a ``Literal``'s (e.g. conml_loss). Checked on the YAML and command-line
    values before parsing, so the error names the key and suggests the closest value."""
    from transformers.trainer_utils import SchedulerType  # ICLTrainingArguments types it as str

    choices = {"lr_scheduler_type": [str(member.value) for member in SchedulerType]}
    for key, hint in _field_types().items():
        for option in _options(hint):
            if isinstance(option, type) and issubclass(option, enum.Enum):
                choices[key] = [str(member.value) for member in option]
            elif typing.get_origin(option) is Literal:
                choices[key] = [str(value) for value in typing.get_args(option)]
    return choices


def _cli_values(argv: list[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs of the command line, keys with underscores."""
    values = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        key, equals, value = arg[2:].partition("=")
        if equals:
            values[key.replace("-", "_")] = value
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values[key.replace("-", "_")] = argv[i + 1]
    return values


class RecipeParser(HfArgumentParser):
    """``HfArgumentParser`` whose errors are one-line ``RecipeError``s instead of a usage dump."""

    def error(self, message: str):  # argparse calls this for bad values, missing values, ...
        raise RecipeError(_argparse_message(message))


def _argparse_message(message: str) -> str:
    match = re.match(r"argument --([\w-]+)(?:/\S+)?: (.*)", message)
    if not match:
        return f"{message}; run with --help to list every key"
    key, problem = match.group(1).replace("-", "_"), match.group(2)
    if found := re.match(r"invalid (\w+) value: (.*)", problem):
        kind = {"int": "an integer", "float": "a number"}.get(found.group(1), f"a {found.group(1)}")
        return f"{key}={found.group(2)} is not {kind}; pass {kind}"
    if found := re.match(r"invalid choice: (.*?) \(choose from (.*)\)", problem):
        return f"{key}={found.group(1)} is not allowed; choose one of: {found.group(2)}"
    if problem.startswith("expected one argument"):
        return f"--{key} needs a value: --{key} VALUE"
    if found := re.match(r"Truthy value expected: got (\S+)", problem):
        return f"{key}={found.group(1)!r} is not a boolean; pass true or false"
    return f"{key}: {problem}"


def build_parser() -> HfArgumentParser:
    """The training parser: one ``--help`` section per recipe section, the recipe in the usage line."""
    from .errors import TRACEBACK_FLAG, TRACEBACK_HELP, command_name

    prog = command_name("python -m icl_conml.train", "icl_conml train")
    parser = RecipeParser(
        SECTIONS,
        prog=prog,
        usage=f"{prog} [RECIPE] [--key value ...] [{TRACEBACK_FLAG}]",
        description="Meta-train an in-context learner (with ConML unless conml_lambda=0); the same command "
        "runs under `accelerate launch -m icl_conml.train` on any number of processes. RECIPE: a YAML file "
        "of key: value lines, or the name of a packaged recipe (python -m icl_conml.resources list); its "
        "keys are the options below, and --key value overrides one. Without a RECIPE: the quickstart "
        "(the defaults below).",
    )
    parser.add_argument(
        TRACEBACK_FLAG,
        action="store_true",
        default=argparse.SUPPRESS,  # removed before parsing (icl_conml.errors.run_main)
        help=f"{TRACEBACK_HELP} A bare --debug does the same (--debug VALUE is TrainingArguments.debug).",
    )
    return parser


def parse_recipe(argv: list[str] | None = None) -> Recipe:
    """``[RECIPE.yaml] [--key value ...]``: YAML values become defaults, flags override them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    raw: dict[str, Any] = {}
    if argv and not argv[0].startswith("-"):
        raw = load_yaml(_recipe_path(argv.pop(0)))
    parser = build_parser()
    parser.set_defaults(**raw)
    for i, arg in enumerate(argv):
        key = arg[2:].split("=")[0].replace("-", "_")
        if arg.startswith("--") and key not in known_keys() and arg not in ("--help", "-h"):
            raise RecipeError(f"unknown option --{key}{_suggest(key)}")
        if not arg.startswith("-") and i == 0:
            raise RecipeError(f"unexpected argument {arg!r}; the recipe path must come first")
    given = {**raw, **_cli_values(argv)}
    for key, allowed in _enum_choices().items():
        if isinstance(given.get(key), str):  # TrainingArguments would say "not a valid X", not which key
            _choice(key, given[key], allowed)
    try:
        model, task, conml_args, training = parser.parse_args_into_dataclasses(
            args=argv, look_for_args_file=False
        )
    except RecipeError:
        raise
    except ValueError as error:  # TrainingArguments' own checks
        message = str(error).strip().splitlines()[0]
        if message.startswith("Some specified arguments are not used"):
            unused = message.partition(": ")[2]
            message = f"unexpected argument(s) {unused}; options are --key value (run with --help to list every key)"
        raise RecipeError(message) from None
    overrides = {arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    raw.update({key: _value_of(key, (model, task, conml_args, training)) for key in overrides})
    return Recipe(model=model, task=task, conml=conml_args, training=training, raw=raw)


def _value_of(key: str, sections: tuple[Any, ...]) -> Any:
    """A section's value as plain YAML data (enums become their string value)."""
    for section in sections:
        if hasattr(section, key):
            value = getattr(section, key)
            return value.value if isinstance(value, enum.Enum) else value
    return None


def validate(recipe: Recipe) -> None:
    """Checks that involve several sections (each section checks itself on construction)."""
    task, model, conml_args, training = recipe.task, recipe.model, recipe.conml, recipe.training
    if model.n_positions is not None:
        _require(
            model.n_positions >= task.n_points,
            f"n_points={task.n_points} is beyond the model's n_positions={model.n_positions}; "
            f"raise n_positions or lower n_points",
        )
    _require(
        training.max_steps >= 1,
        f"max_steps={training.max_steps} must be >= 1 (prompts are generated on the fly)",
    )
    _require(
        training.per_device_train_batch_size >= 1,
        f"per_device_train_batch_size={training.per_device_train_batch_size} must be >= 1",
    )
    _validate_reporting(training)
    _validate_optimizer(training)
    _validate_sizes(recipe)
    _require(
        training.gradient_accumulation_steps >= 1,
        f"gradient_accumulation_steps={training.gradient_accumulation_steps} must be >= 1",
    )
    for key in ("logging_steps", "save_steps", "eval_steps"):
        strategy = getattr(training, key.replace("_steps", "_strategy"))
        value = getattr(training, key)
        if str(getattr(strategy, "value", strategy)) == "steps" and value is not None:
            _require(value > 0, f"{key}={value} must be > 0 (a number of steps, or a fraction of max_steps)")
    if str(getattr(training.eval_strategy, "value", training.eval_strategy)) != "no":
        _require(
            task.eval_n_prompts > 0 or task.eval_set is not None,
            f"eval_strategy={getattr(training.eval_strategy, 'value', training.eval_strategy)!r} needs an "
            f"eval set but eval_n_prompts=0; set eval_n_prompts > 0 or eval_strategy=no",
        )
    if conml_args.enabled:
        smallest = task.curriculum_points_start or task.n_points
        _require(
            smallest >= 2,
            f"ConML needs prompts of at least 2 points to build a view, but the run has {smallest}; "
            f"raise n_points (or curriculum_points_start) or set conml_lambda=0",
        )
        global_batch = training.per_device_train_batch_size * training.world_size
        _require(
            global_batch >= 2,
            "ConML needs at least 2 tasks per batch for d_out; raise per_device_train_batch_size",
        )
    _validate_attention(model, conml_args, training)


def _validate_attention(
    model: ModelArguments, conml_args: ConMLArguments, training: TrainingArguments
) -> None:
    """A kernel that cannot apply ConML's probe mask is refused, not left to drop it silently."""
    from .modeling import MASK_KERNELS

    kernel = model.attn_implementation
    if kernel in MASK_KERNELS:
        return
    _require(
        not conml_args.enabled,
        f"attn_implementation={kernel} takes no attention mask, which ConML's probe tokens need "
        f"(conml_lambda={conml_args.conml_lambda}); use attn_implementation=sdpa (or eager), or conml_lambda=0",
    )
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    available = is_flash_attn_3_available() if kernel == "flash_attention_3" else is_flash_attn_2_available()
    package = "flash-attn 3 (flash_attn_interface)" if kernel == "flash_attention_3" else "flash-attn"
    _require(
        available,
        f"attn_implementation={kernel} needs a CUDA GPU and the {package} package, not found here; "
        f"install it or use attn_implementation=sdpa",
    )
    _require(
        training.bf16 or training.fp16,
        f"attn_implementation={kernel} runs in bf16/fp16 only; set bf16: true or use attn_implementation=sdpa",
    )


def _validate_sizes(recipe: Recipe) -> None:
    """Sizes that cannot fit in this machine's memory are refused with the estimate (``memory.py``)."""
    from .memory import too_large, training_memory

    problem = too_large(training_memory(recipe))
    _require(
        problem is None,
        f"this recipe {problem}; lower n_dims, n_points, the batch size or eval_n_prompts",
    )


def _validate_optimizer(training: TrainingArguments) -> None:
    """The optimiser's numbers are finite and in range: a NaN or infinite one passes the loss and
    gradient checks of step 1 but poisons its update (or fails deep inside torch)."""
    for key in OPTIMIZER_NUMBERS:
        value = getattr(training, key)
        _require(math.isfinite(value), f"{key}={value} must be a finite number")
    _require(training.learning_rate >= 0, f"learning_rate={training.learning_rate} must be >= 0")
    _require(training.weight_decay >= 0, f"weight_decay={training.weight_decay} must be >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        _require(0 <= getattr(training, key) < 1, f"{key}={getattr(training, key)} must be in [0, 1)")
    _require(training.adam_epsilon >= 0, f"adam_epsilon={training.adam_epsilon} must be >= 0")


#: ``TrainingArguments`` numbers that must be finite (checked before anything is built).
OPTIMIZER_NUMBERS = (
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "warmup_steps",
)


def _validate_reporting(training: TrainingArguments) -> None:
    """``report_to`` names a known, installed backend (the Trainer would fail after building the model)."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    from .extras import EXTRAS

    available = get_available_reporting_integrations()
    for name in training.report_to or []:
        _choice("report_to", name, ("none", "all", *INTEGRATION_TO_CALLBACK))
        _require(
            name in ("none", "all") or name in available,
            f"report_to={name!r} needs the {name} package, which is not installed; "
            f"pip install {EXTRAS.get(name, name)} or set report_to=none",
        )
