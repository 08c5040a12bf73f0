"""The recipe's keys: one argument dataclass per section, with types, defaults, help and checks.

A recipe is one flat YAML mapping whose keys are the fields below and the standard
``transformers.TrainingArguments`` names (``ICLTrainingArguments`` gives them CPU-sized
defaults); any key may be overridden on the command line (``--key value``). A key a recipe omits
takes the default below (a CPU-sized linear-regression run); without a recipe the train command
runs the packaged ``recipes/quickstart.yaml`` (``recipe_parser.BUILT_IN_RECIPE``). Each section
checks its own values when it is built (``__post_init__``) and raises ``RecipeError``: one line
naming the key, the value and what is allowed, before any model is built. ``Recipe`` holds the
four sections and writes the resolved recipe (``to_dict``). Reading files, parsing and
cross-section checks live in ``recipe_files``, ``recipe_parser`` and ``recipe_checks``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainingArguments

from . import conml
from .errors import UserError
from .registry import Registry
from .tasks import TASKS, FunctionClass, get_task, hyperparameter_names, resolve_task_class


class RecipeError(UserError, ValueError):
    """A user error in a recipe or on the command line: one line, no traceback needed (exit 2)."""


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


def require(condition: bool, message: str) -> None:
    """Raise ``RecipeError(message)`` unless ``condition`` holds."""
    if not condition:
        raise RecipeError(message)


def check_choice(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    """Refuse a value outside ``allowed`` in one line naming the closest allowed one."""
    if value not in allowed:
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{key}={value!r} is not allowed{hint}; choose one of: {', '.join(allowed)}")


def check_registered(key: str, value: str, registry: Registry) -> None:
    """A registered name (a typo gets ``check_choice``'s did-you-mean) or the user's own import path
    ``package.module:name``: a recipe is the user's code, so it is imported now and checked to be of
    the registry's kind (a one-line ``RecipeError`` otherwise), before anything is built."""
    if ":" not in str(value):
        check_choice(key, value, registry.names())
        return
    try:
        registry.resolve(value, allow_import=True)
    except ValueError as error:
        raise RecipeError(f"{key}={value!r}: {str(error).splitlines()[0]}") from None


@dataclass(frozen=True)
class KeyRole:
    """What a recipe key is to ``recipe.yaml``, to a resume and to experiment pairing.

    Declared once per key, on the argument dataclass that holds it: its ``_key_roles``, else
    the section's ``_default_role``; read with ``key_role``. (Not as dataclass field metadata:
    ``HfArgumentParser`` passes every metadata entry on to argparse, which refuses unknown ones,
    and the inherited ``TrainingArguments`` fields are declared by transformers.)
    """

    name: str
    # In recipe.yaml (and so the run history and trackers): always, when set, or never.
    recipe: Literal["always", "if set", "never"]
    resumable: bool  # a resume may change it; else the resumed run would be another experiment
    paired: bool  # runs that differ in it are not paired by the experiment analysis


#: What is trained: model, task, ConML, data, optimiser, schedule, seeds, precision.
EXPERIMENT = KeyRole("experiment", "always", resumable=False, paired=True)
#: What is measured during training (eval prompts, when, in what batches).
EVALUATION = KeyRole("evaluation", "always", resumable=True, paired=True)
#: How the run is carried out: devices, kernels, compilation, workers, distribution, evaluation details.
EXECUTION = KeyRole("execution", "if set", resumable=True, paired=True)
#: Where the run's files and logs go, and how often it logs and saves.
OUTPUT = KeyRole("output", "always", resumable=True, paired=False)
#: Display, names, log levels, Hub pushing: what is shown or kept, not what is trained or measured.
BOOKKEEPING = KeyRole("bookkeeping", "if set", resumable=True, paired=False)
#: This invocation only (resume, overwrite, credentials): never recorded, so re-running a saved
#: recipe neither resumes nor overwrites.
RUN_CONTROL = KeyRole("run control", "never", resumable=True, paired=False)


#: Attention kernels a recipe may name; the flash kernels take no attention mask (plain ICL only).
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"]
ATTN_IMPLEMENTATIONS: tuple[str, ...] = typing.get_args(AttnImplementation)
#: GPT-2's activations (``transformers.activations.ACT2FN`` names): ``gelu_new`` is GPT-2's and Garg
#: et al.'s; ``gelu_pytorch_tanh`` is the same function as one fused kernel (rounds differently, ~5e-7).
Activation = Literal["gelu_new", "gelu_pytorch_tanh", "gelu", "relu"]
ACTIVATIONS: tuple[str, ...] = typing.get_args(Activation)


@dataclass
class ModelArguments:
    """The in-context learner: read-in → backbone → read-out."""

    _argument_group_name = "model"  # a section of --help (HfArgumentParser)
    _default_role = EXPERIMENT  # every key of this section (see KeyRole)

    n_embd: int = _help("Hidden width of the default GPT-2 backbone.", default=64)
    n_layer: int = _help("Number of layers of the default GPT-2 backbone.", default=4)
    n_head: int = _help("Attention heads of the default GPT-2 backbone (must divide n_embd).", default=4)
    n_positions: int | None = _help(
        "Most (x, y) pairs a prompt may hold (default: n_points, or the curriculum's end).", default=None
    )
    dropout: float = _help("Dropout of the backbone (0 by default, as in Garg et al.).", default=0.0)
    activation_function: Activation = _help(
        "MLP activation of the default GPT-2 backbone (a pretrained backbone keeps its own, like its size): "
        "gelu_new (default: GPT-2's and Garg et al.'s) or "
        "gelu_pytorch_tanh (the same function as one fused kernel, rounding differs by ~5e-7: a training step "
        "of a 64-wide 4-layer model on 2 CPU cores takes 0.85x the time; the quickstart uses it), gelu, relu.",
        default="gelu_new",
    )
    init_perturbation_std: float = _help(
        "Add N(0, std) noise to every initial weight (drawn from its own generator seeded by `seed`): "
        "0 (default) = off. An A/A control arm sets a rounding-level std (e.g. 1e-7) to measure how far "
        "float rounding alone moves a run.",
        default=0.0,
    )
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
        require(self.lora_r >= 0, f"lora_r={self.lora_r} must be >= 0 (0 = no LoRA)")
        require(self.lora_alpha > 0, f"lora_alpha={self.lora_alpha} must be > 0")
        require(0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        require(
            self.lora_target_modules is None or self.lora_r > 0,
            f"lora_target_modules={self.lora_target_modules} is set but lora_r=0 (LoRA off); set lora_r > 0",
        )
        for key in ("n_embd", "n_layer", "n_head"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        require(
            self.n_embd % self.n_head == 0,
            f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick n_head dividing n_embd",
        )
        require(0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)")
        require(
            self.init_perturbation_std >= 0 and math.isfinite(self.init_perturbation_std),
            f"init_perturbation_std={self.init_perturbation_std} must be a finite number >= 0 (0 = off)",
        )
        check_choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        check_choice("activation_function", self.activation_function, ACTIVATIONS)


@dataclass
class TaskArguments:
    """The function class that prompts are drawn from, and the curriculum."""

    _argument_group_name = "task"
    _default_role = EXPERIMENT
    _key_roles = {"eval_n_prompts": EVALUATION, "eval_seed": EVALUATION, "eval_set": EVALUATION}

    task: str = _help(
        f"Function class: one of {', '.join(TASKS)}, or your own as 'package.module:ClassName' "
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
        check_registered("task", self.task, TASKS)
        require(self.n_dims >= 1, f"n_dims={self.n_dims} must be >= 1")
        require(self.n_points >= 1, f"n_points={self.n_points} must be >= 1")
        self.task_kwargs = self._task_kwargs_mapping()
        try:  # the class validates its own hyper-parameters: built once, here, and kept for the run
            self._function_class = get_task(self.task, self.n_dims, allow_import=True, **self.task_kwargs)
        except (ValueError, TypeError) as error:
            raise RecipeError(str(error).splitlines()[0]) from None
        require(self.task_pool_size >= 0, f"task_pool_size={self.task_pool_size} must be >= 0 (0 = no pool)")
        require(self.eval_n_prompts >= 0, f"eval_n_prompts={self.eval_n_prompts} must be >= 0")
        require(self.eval_seed >= 0, f"eval_seed={self.eval_seed} must be >= 0")
        for name, end in (("dims", self.n_dims), ("points", self.n_points)):
            start = getattr(self, f"curriculum_{name}_start")
            if start is None:
                continue
            require(start >= 1, f"curriculum_{name}_start={start} must be >= 1")
            require(
                end >= start,
                f"curriculum end below start: n_{name}={end} < curriculum_{name}_start={start}; "
                f"the curriculum grows from its start up to n_{name}",
            )
            require(getattr(self, f"curriculum_{name}_inc") >= 1, f"curriculum_{name}_inc must be >= 1")
            require(
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
        require(mapping is None or isinstance(mapping, dict), f"task_kwargs={mapping!r} must be a mapping")
        mapping = dict(mapping or {})
        try:  # a recipe is the user's own code: an import path in it is imported
            accepted = hyperparameter_names(resolve_task_class(self.task, allow_import=True))
        except ValueError as error:
            raise RecipeError(str(error).splitlines()[0]) from None
        unknown = sorted(set(mapping) - set(accepted))
        require(
            not unknown,
            f"task_kwargs has {unknown} but {self.task} takes {', '.join(accepted) or 'no hyper-parameters'}",
        )
        for key in FLAT_TASK_KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            require(
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

    @property
    def function_class(self) -> FunctionClass:
        """The function class this section describes (defaults from the class itself), built once
        when the section is: the model, the prompts and the metrics of a run share it."""
        return self._function_class

    def hyperparameters(self) -> dict[str, Any]:
        """Every hyper-parameter of the function class, defaults included (recorded in the model config)."""
        return self.function_class.hyperparameters()


# The built-in classes' hyper-parameters that also have a flat recipe key (``sparsity: 2``).
FLAT_TASK_KEYS = ("sparsity", "noise_std", "hidden_size", "depth")


@dataclass
class ConMLArguments:
    """The ConML contrastive meta-objective (see icl_conml/conml.py).

    The fixed choices are ``Literal`` types (``--help`` lists them, the parser checks them); the
    representation, views and distance are registries that a user extends
    (``conml.register_view`` / ``register_distance`` / ``register_representation``, or an import
    path ``package.module:function``), checked against the registry when the recipe is built.
    """

    _argument_group_name = "ConML"
    _default_role = EXPERIMENT

    conml_lambda: float = _help("Weight λ of the ConML term; 0 = plain ICL training.", default=0.02)
    conml_lambda_start: int = _help(
        "Steps trained with λ = 0 before the ConML term starts (e.g. to let plain ICL leave the loss plateau).",
        default=0,
    )
    conml_lambda_warmup: int = _help(
        "Steps over which λ then rises linearly from 0 to conml_lambda (0: at once).", default=0
    )
    conml_representation: str = _help(
        f"What a probe reads, a registered name: {' | '.join(conml.REPRESENTATIONS)} (the model's "
        f"prediction at the probe, the paper's, or its last hidden state), or package.module:function.",
        default="probe_output",
    )
    conml_num_probes: int = _help("Probes M per step (M > 1 gives a vector representation).", default=1)
    conml_views: str = _help(
        f"View sampler, a registered name: {' | '.join(conml.VIEWS)} (conml.register_view adds one), "
        f"or package.module:function.",
        default="prefix_half",
    )
    conml_num_views: int = _help("Views K per task.", default=1)
    conml_subset_min: float = _help(
        "Smallest view, as a fraction of the context (subset views).", default=0.5
    )
    conml_subset_max: float = _help("Largest view, as a fraction of the context (subset views).", default=0.5)
    conml_distance: str = _help(
        f"Distance φ, a registered name: {' | '.join(conml.DISTANCES)} (conml.register_distance adds "
        f"one), or package.module:function.",
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
        require(self.conml_lambda >= 0, f"conml_lambda={self.conml_lambda} must be >= 0 (0 = plain ICL)")
        check_registered("conml_representation", self.conml_representation, conml.REPRESENTATIONS)
        check_registered("conml_views", self.conml_views, conml.VIEWS)
        check_registered("conml_distance", self.conml_distance, conml.DISTANCES)
        check_choice("conml_loss", self.conml_loss, conml.LOSSES)
        check_choice("conml_terms", self.conml_terms, conml.TERMS)
        check_choice("conml_prefix_mode", self.conml_prefix_mode, conml.PREFIX_MODES)
        require(self.conml_lambda_start >= 0, f"conml_lambda_start={self.conml_lambda_start} must be >= 0")
        require(self.conml_lambda_warmup >= 0, f"conml_lambda_warmup={self.conml_lambda_warmup} must be >= 0")
        require(self.conml_num_probes >= 1, f"conml_num_probes={self.conml_num_probes} must be >= 1")
        require(self.conml_num_views >= 1, f"conml_num_views (K)={self.conml_num_views} must be >= 1")
        require(
            0 < self.conml_subset_min <= self.conml_subset_max <= 1,
            f"view subset bounds must satisfy 0 < conml_subset_min <= conml_subset_max <= 1 "
            f"(got {self.conml_subset_min}, {self.conml_subset_max}); they are fractions of the context",
        )
        require(self.conml_temperature > 0, f"conml_temperature={self.conml_temperature} must be > 0")
        require(
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
    """``TrainingArguments`` with CPU-sized defaults for in-context meta-training."""

    _argument_group_name = "training (transformers.TrainingArguments)"
    _default_role = EXECUTION  # a TrainingArguments field not named below
    _key_roles = {
        **dict.fromkeys(
            ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
             "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args",
             "optim_target_modules", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
             "seed", "data_seed", "bf16", "fp16", "tf32", "full_determinism", "neftune_noise_alpha",
             "auto_find_batch_size", "ignore_data_skip", "load_best_model_at_end", "metric_for_best_model",
             "greater_is_better"),
            EXPERIMENT,
        ),
        **dict.fromkeys(("eval_strategy", "eval_steps", "per_device_eval_batch_size"), EVALUATION),
        **dict.fromkeys(("output_dir", "logging_steps", "save_steps", "save_total_limit", "report_to"), OUTPUT),
        **dict.fromkeys(
            ("logging_strategy", "logging_first_step", "logging_nan_inf_filter", "log_on_each_node", "log_level",
             "log_level_replica", "include_num_input_tokens_seen", "skip_memory_metrics", "disable_tqdm",
             "run_name", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
             "save_strategy", "save_only_model", "save_on_each_node", "push_to_hub", "hub_model_id",
             "hub_strategy", "hub_private_repo", "hub_always_push", "hub_revision"),
            BOOKKEEPING,
        ),
        **dict.fromkeys(
            ("resume_from_checkpoint", "overwrite_output_dir", "resume_weights_only", "resume_extend_schedule",
             "resume_allow_changes", "restore_callback_states_from_checkpoint", "hub_token"),
            RUN_CONTROL,
        ),
    }  # fmt: skip

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
    resume_allow_changes: list[str] | None = _help(
        "Keys a resume may change on purpose although they alter the experiment (e.g. learning_rate after a "
        "divergence); each change is recorded in run_history.jsonl.",
        default=None,
    )

    def __post_init__(self) -> None:
        from .extras import is_available, message

        # TrainingArguments would fail on a DeepSpeed config without deepspeed with a TypeError.
        require(
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

    return torch.accelerator.is_available()  # torch >= 2.6 (the package needs >= 2.11)


SECTIONS = (ModelArguments, TaskArguments, ConMLArguments, ICLTrainingArguments)


@dataclass
class Recipe:
    """The four sections of a resolved recipe (``raw``: the keys the file or command line set), and
    what they imply, derived once: the function class, ``n_positions`` and the global batch."""

    model: ModelArguments
    task: TaskArguments
    conml: ConMLArguments
    training: ICLTrainingArguments
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def function_class(self) -> FunctionClass:
        """The run's function class (one instance: model, sampler, eval prompts and metrics share it)."""
        return self.task.function_class

    @functools.cached_property
    def n_positions(self) -> int:
        """The most (x, y) pairs a prompt may hold: ``n_positions``, else ``n_points``."""
        return self.model.n_positions or self.task.n_points

    @functools.cached_property
    def global_batch_size(self) -> int:
        """Prompts per optimizer step over every process and accumulation step."""
        training = self.training
        return (
            training.per_device_train_batch_size * training.world_size * training.gradient_accumulation_steps
        )

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe: every key whose role is always recorded (``KeyRole.recipe``: what
        defines the experiment, what is measured, where the output goes), defaults included, and
        any other key the recipe or command line set but run control; values as plain YAML data.

        Saved as ``recipe.yaml`` (loading it back gives the same dict), recorded for each run
        segment in ``run_history.jsonl`` (what a resume is compared with) and by every tracker.
        """
        out: dict[str, Any] = {}
        for section in (self.model, self.task, self.conml, self.training):
            for f in dataclasses.fields(section):
                if f.init and f.name not in out and key_role(f.name).recipe == "always":
                    out[f.name] = plain_value(copy.deepcopy(getattr(section, f.name)))
        for key, value in self.raw.items():
            if key not in out and key_role(key) is not RUN_CONTROL:
                out[key] = plain_value(value)
        return out


#: Roles of keys derived from the recipe rather than set in it (recorded in the run history).
DERIVED_ROLES = {"global_batch_size": EXPERIMENT}


def key_role(key: str) -> KeyRole | None:
    """The role a key's argument dataclass declares for it (``KeyRole``); None for an unknown key."""
    return _roles().get(key)


@functools.cache
def _roles() -> dict[str, KeyRole]:
    roles = dict(DERIVED_ROLES)
    for section in SECTIONS:
        declared = getattr(section, "_key_roles", {})
        for f in dataclasses.fields(section):
            if f.init:
                roles.setdefault(f.name, declared.get(f.name, section._default_role))
    return roles


def plain_value(value: Any) -> Any:
    """A value as plain YAML data (enums become their string value)."""
    return value.value if isinstance(value, enum.Enum) else value


def known_keys() -> list[str]:
    """Every key a recipe or the command line may set, section by section."""
    return [f.name for section in SECTIONS for f in dataclasses.fields(section) if f.init]


def suggest_key(key: str) -> str:
    """The end of an "unknown key" message: the closest known key, or where to list them."""
    close = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else "; run with --help to list every key"


def field_types() -> dict[str, Any]:
    """Key → its declared type (the first section declaring it wins)."""
    types_by_key: dict[str, Any] = {}
    for section in SECTIONS:
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            types_by_key.setdefault(f.name, hints.get(f.name))
    return types_by_key


def type_options(hint: Any) -> tuple[Any, ...]:
    """The members of a union type hint (``int | None`` → ``(int, NoneType)``), else ``(hint,)``."""
    is_union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return typing.get_args(hint) if is_union else (hint,)
