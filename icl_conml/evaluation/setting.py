"""What is evaluated: the task, the prompts and the reference estimators, resolved from the
arguments and the model's saved config (an eval set must match the model)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..baselines import BaselineError, BaselineSpec, parse_baseline, sklearn_available
from ..data import PromptError, Prompts, sample_prompts
from ..memory import evaluation_memory, task_parameters, too_large
from ..tasks import FunctionClass, get_task, resolve_task_class
from .arguments import CommonArguments, EvaluationError, check_arguments
from .loading import load_eval_set


@dataclass
class Setting:
    """What is evaluated: the task, the prompts and where they came from."""

    task: FunctionClass
    task_kwargs: dict[str, Any]
    n_points: int
    prompts: Prompts
    source: dict[str, Any]

    def metadata(self) -> dict[str, Any]:
        """The setting as results.json records it: task, sizes and where the prompts came from."""
        return {
            "task": self.task.name,
            "task_kwargs": self.task_kwargs,
            "n_dims": self.task.n_dims,
            "n_points": self.n_points,
            "n_prompts": int(self.prompts.xs.shape[0]),
            "seed": self.source["seed"],
            "eval_set": self.source["eval_set"],
            "ood": self.source["ood"],
        }


def parse_task_kwargs(value: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """``--task_kwargs``: a mapping, or its JSON text (as the command line gives it)."""
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise EvaluationError(f"--task_kwargs {value!r} is not JSON; e.g. '{{\"noise_std\": 0.5}}'") from None
    if not isinstance(parsed, dict):
        raise EvaluationError("--task_kwargs must be a JSON object")
    return parsed


def resolve_setting(config, args: CommonArguments, own_task: FunctionClass | None = None) -> Setting:
    """Task, dimension and length default to the model's saved ``config``; an eval set must match.

    ``own_task``: the model's own function class (``ICLModel.task_class``), used when the evaluation
    asks for exactly the task the model was trained on (rather than building another one)."""
    check_arguments(args)
    task_name = args.task or config.task
    try:
        # --task is the user's own choice; the model's task was checked when the model was loaded
        resolve_task_class(task_name, allow_import=args.task is not None)
    except ValueError as error:
        raise EvaluationError(str(error).replace("unknown task", "unknown --task", 1)) from None
    kwargs = dict(config.task_kwargs if task_name == config.task else {})
    kwargs.update(parse_task_kwargs(args.task_kwargs) or {})
    dims = args.n_dims or config.n_dims
    if dims > config.n_dims:
        raise EvaluationError(
            f"--n_dims {dims} is larger than the model's input dimension {config.n_dims}; use at most {config.n_dims}"
        )
    if args.eval_set is not None:
        return _eval_set_setting(config, args, task_name, dims, kwargs)
    length = args.n_points or config.n_positions
    if length > config.n_positions:
        raise EvaluationError(
            f"--n_points {length} is beyond the model's n_positions={config.n_positions}; use at most that"
        )
    own = (task_name, dims, kwargs) == (config.task, config.n_dims, config.task_kwargs)
    try:
        function_class = own_task if own and own_task is not None else get_task(task_name, dims, **kwargs)
    except ValueError as error:
        raise EvaluationError(str(error)) from None
    per_task = task_parameters(function_class)
    problem = too_large(evaluation_memory(args.n_prompts, length, dims, per_task))
    if problem is not None:
        raise EvaluationError(f"this evaluation {problem}; lower --n_prompts")
    try:
        prompts = sample_prompts(function_class, args.n_prompts, length, args.seed, args.ood)
    except PromptError as error:  # a bad --ood: the evaluation's own error type, same line
        raise EvaluationError(str(error)) from None
    source = {"eval_set": None, "seed": args.seed, "ood": args.ood}
    return Setting(function_class, kwargs, prompts.xs.shape[1], prompts, source)


def _eval_set_setting(
    config, args: CommonArguments, task_name: str, dims: int, kwargs: dict[str, Any]
) -> Setting:
    eval_set = args.eval_set
    if args.ood is not None:
        raise EvaluationError(
            "--ood and --eval_set exclude each other: an eval set holds its prompts; "
            "build a shifted one with `icl_conml make-eval-sets --ood`"
        )
    prompts, meta = load_eval_set(eval_set, trust_remote_code=args.trust_remote_code)
    if meta["task"] != task_name or meta["n_dims"] != dims:
        raise EvaluationError(
            f"eval set {eval_set!r} holds {meta['task']} prompts of dimension {meta['n_dims']}, but the "
            f"evaluation is {task_name} with n_dims={dims}; build a matching set with "
            f"`icl_conml make-eval-sets` or pass --task/--n_dims"
        )
    if meta["n_points"] > config.n_positions:
        raise EvaluationError(
            f"eval set {eval_set!r} has {meta['n_points']} points per prompt, more than the model's "
            f"n_positions={config.n_positions}"
        )
    if args.n_points is not None and args.n_points != meta["n_points"]:
        raise EvaluationError(
            f"--n_points {args.n_points} differs from the eval set's {meta['n_points']}; drop it"
        )
    kwargs = {**kwargs, **meta["task_kwargs"]}
    function_class = get_task(task_name, dims, **kwargs)
    source = {"eval_set": eval_set, "seed": meta["seed"], "ood": meta["ood"]}
    return Setting(function_class, kwargs, prompts.xs.shape[1], prompts, source)


def resolve_baselines(
    names: Sequence[str] | None, task: FunctionClass
) -> tuple[list[BaselineSpec], list[str]]:
    """Specs for ``names`` (default: the task's); scikit-learn ones are skipped, with a note,
    when they are defaults and scikit-learn is missing, and are an error when asked for."""
    notes = []
    requested = list(names) if names is not None else list(task.default_baselines)
    specs = []
    try:
        for name in requested:
            spec = parse_baseline(name, task)
            if spec.needs_sklearn and not sklearn_available():
                if names is not None:
                    raise BaselineError(
                        f"baseline {name!r} needs scikit-learn, which is not installed; pip install 'icl_conml[trees]'"
                    )
                notes.append(
                    f"skipped {name}: scikit-learn is not installed (pip install 'icl_conml[trees]')"
                )
                continue
            specs.append(spec)
    except BaselineError as error:
        raise EvaluationError(str(error)) from None
    return specs, notes
