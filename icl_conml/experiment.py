"""Paired multi-seed studies: ``python -m icl_conml.experiment SPEC.yaml [--jobs N]``.

A spec names a base recipe, the arms (plain ICL and ConML variants as recipe-key overrides),
the seeds and the evaluation. Every arm of a seed trains from the same seed, hence the same
initial weights and training prompts: only the arm's keys differ (pairing). Each run is an
ordinary training run (``python -m icl_conml.train``, or any ``launcher`` such as
``accelerate launch -m icl_conml.train``) in its own process, evaluated during training on one
fixed prompt set shared by every run. When a run ends, a small JSON record (resolved recipe,
commit, version, attention kernel, training log, eval curves) is written under ``records_dir``;
a run with a record is never trained again, so re-running the command resumes a study (an
interrupted run resumes from its latest checkpoint). Specs may share a ``records_dir`` (an arm
with the same name and settings is then the same run, trained once). A spec with a larger
``max_steps`` that shares ``output_dir`` with a finished one continues its runs from their last
checkpoint (a longer study at the cost of the extra steps; records stay per spec). The analysis
(``experiment_analysis``) reads only records, so it works on any machine that has them, and
writes each spec's tables and plots to ``records_dir/<spec name>/``.

    python -m icl_conml.experiment recipes/experiments/lr_paper_cpu.yaml --jobs 2
    python -m icl_conml.experiment SPEC --analyze_only          # tables and plots from records
    python -m icl_conml.experiment SPEC --slurm [--submit]      # a SLURM job array, one run per task
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import EXIT_CTRL_C, EXIT_INTERRUPTED, OneLineParser, command_name, entry_point
from .experiment_analysis import analyze, load_records
from .experiment_processes import Children, RunClaim
from .experiment_records import RUN_IDENTITY_KEYS, ExperimentError, expected_settings
from .experiment_spec import (
    check_eval,
    check_values,
    find_spec,
    path_base,
    read_spec_yaml,
    resolve_path,
    resolve_recipe,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LAUNCHER = f"{sys.executable} -m icl_conml.train"
SEGMENTS = "experiment_segments.jsonl"


@dataclass
class EvalSpec:
    """How every run is evaluated: the same prompts for all (``eval_set``, or sampled from ``seed``)."""

    n_prompts: int = 1000
    seed: int = 20261130
    eval_set: str | None = None
    every: int = 250
    thresholds: list[float] = field(default_factory=lambda: [0.1, 0.05])
    bootstrap_samples: int = 1000


@dataclass
class Spec:
    name: str
    base_recipe: str
    arms: dict[str, dict[str, Any]]
    seeds: list[int]
    overrides: dict[str, Any] = field(default_factory=dict)
    reference_arm: str | None = None
    eval: EvalSpec = field(default_factory=EvalSpec)
    output_dir: str | None = None
    records_dir: str | None = None
    launcher: str | None = None
    keep_weights: bool = True
    slurm: dict[str, Any] = field(default_factory=dict)
    gpu_hours: str | None = None
    control_arm: str | None = None
    paths_relative_to: str = "spec"
    path: Path | None = None

    @property
    def reference(self) -> str:
        return self.reference_arm or next(iter(self.arms))

    @property
    def out(self) -> Path:
        """The run folders' parent (``load_spec`` resolves ``output_dir``)."""
        return Path(self.output_dir or f"runs/experiments/{self.name}")

    @property
    def records(self) -> Path:
        return Path(self.records_dir) if self.records_dir else self.out / "records"

    @property
    def analysis(self) -> Path:
        """Where this spec's tables and plots go: a folder of its own, since specs may share records."""
        return self.records / self.name

    def runs(self) -> list[Run]:
        """Seed-major order, so that an interrupted study leaves complete pairs behind."""
        return [Run(self, arm, seed) for seed in self.seeds for arm in self.arms]


_SPEC_KEYS = {f for f in Spec.__dataclass_fields__ if f != "path"}
_EVAL_KEYS = set(EvalSpec.__dataclass_fields__)


def load_spec(path: str | Path, *, records_dir: str | None = None, output_dir: str | None = None) -> Spec:
    """Read and check a spec file (a path, or a packaged spec's name); every problem is one
    ``ExperimentError`` line. Relative paths in the spec are resolved against its
    ``paths_relative_to`` folder; ``records_dir``/``output_dir`` (the command's overrides)
    against the working directory. ``check_arms`` checks each arm's recipe."""
    path = find_spec(str(path))
    data = read_spec_yaml(path)
    unknown = set(data) - _SPEC_KEYS
    if unknown:
        raise ExperimentError(
            f"unknown spec key(s) {sorted(unknown)} in {path}; allowed: {sorted(_SPEC_KEYS)}"
        )
    for key in ("name", "base_recipe", "arms", "seeds"):
        if key not in data:
            raise ExperimentError(f"spec {path} lacks {key!r}")
    check_values(data, path)
    eval_data = data.pop("eval", None) or {}
    if not isinstance(eval_data, dict) or set(eval_data) - _EVAL_KEYS:
        raise ExperimentError(
            f"unknown eval key(s) {sorted(set(eval_data) - _EVAL_KEYS)} in {path}; allowed: {sorted(_EVAL_KEYS)}"
        )
    spec = Spec(**data, eval=EvalSpec(**check_eval(eval_data, path)), path=path)
    spec.overrides = spec.overrides or {}
    spec.slurm = spec.slurm or {}
    if spec.name in spec.arms:
        raise ExperimentError(
            f"spec {path}: name {spec.name!r} is also an arm's name; rename one (both are folders)"
        )
    if spec.control_arm is not None and spec.control_arm == spec.reference:
        raise ExperimentError(
            f"spec {path}: control_arm={spec.control_arm!r} is the reference arm; the control is another arm "
            f"that repeats the reference's settings (with init_perturbation_std)"
        )
    for key in RUN_IDENTITY_KEYS - {"run_name", "logging_dir"}:
        if key in spec.overrides or any(key in arm for arm in spec.arms.values()):
            raise ExperimentError(f"spec {path}: {key!r} is set by the experiment per run; remove it")
    base = path_base(path, spec.paths_relative_to)
    spec.base_recipe = resolve_recipe(base, spec.base_recipe)
    if spec.eval.eval_set:  # a folder relative to the base, else a Hub id (REPO[:CONFIG]) as written
        local = resolve_path(base, spec.eval.eval_set)
        spec.eval.eval_set = local if Path(local).exists() else spec.eval.eval_set
    spec.output_dir = (
        resolve_path(Path.cwd(), output_dir)
        if output_dir is not None
        else resolve_path(base, spec.output_dir or f"runs/experiments/{spec.name}")
    )
    if records_dir is not None:
        spec.records_dir = resolve_path(Path.cwd(), records_dir)
        if output_dir is None:  # a study retrained from scratch: its own run folders, beside its records
            spec.output_dir = resolve_path(Path.cwd(), os.path.join(records_dir, "runs"))
    elif spec.records_dir is not None:
        spec.records_dir = resolve_path(base, spec.records_dir)
    folders = {spec.records / arm for arm in spec.arms} | {spec.analysis}
    if spec.out in folders or any(folder in spec.out.parents for folder in folders):
        raise ExperimentError(
            f"spec {path}: run folders {spec.out} would lie inside a records folder; give another output_dir"
        )
    return spec


def _flags(values: dict[str, Any]) -> list[str]:
    out = []
    for key, value in values.items():
        if isinstance(value, list):
            out += [f"--{key}", *map(str, value)]
        else:
            out += [f"--{key}", "null" if value is None else str(value)]
    return out


def git_commit() -> dict[str, Any]:
    """The package's git commit and whether its tracked files differ from it (None outside git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "icl_conml"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty)}


@dataclass
class Run:
    spec: Spec
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}"

    @property
    def output_dir(self) -> Path:
        return self.spec.out / self.arm / f"seed{self.seed}"

    @property
    def record_path(self) -> Path:
        return self.spec.records / self.arm / f"seed{self.seed}.json"

    def train_args(self) -> list[str]:
        ev = self.spec.eval
        args = [self.spec.base_recipe, *_flags(self.spec.overrides), *_flags(self.spec.arms[self.arm])]
        args += ["--seed", str(self.seed), "--output_dir", str(self.output_dir)]
        args += ["--eval_strategy", "steps", "--eval_steps", str(ev.every), "--disable_tqdm", "true"]
        if ev.eval_set:
            args += ["--eval_set", ev.eval_set]
        else:
            args += ["--eval_n_prompts", str(ev.n_prompts), "--eval_seed", str(ev.seed)]
        return args

    def command(self) -> list[str]:
        return [*shlex.split(self.spec.launcher or DEFAULT_LAUNCHER), *self.train_args()]

    def max_steps(self) -> int:
        """The training length this run asks for, as the training command will resolve it."""
        from .recipe_parser import parse_recipe

        return parse_recipe(self.train_args()).training.max_steps


def _finished_steps(output_dir: Path) -> int | None:
    """The step a finished training reached (``train`` returned and saved its final model and
    top-level trainer state), or None if training has not finished there."""
    state = output_dir / "trainer_state.json"
    if not state.is_file() or not any(
        (output_dir / name).is_file() for name in ("model.safetensors", "adapter_model.safetensors")
    ):
        return None
    return int(json.loads(state.read_text()).get("global_step", 0))


class RunStopped(ExperimentError):
    """A run stopped by a stop signal (its training saved a checkpoint): not a failure, resumable."""


#: ``execute``'s answer for a run another experiment command is working on (try it again later).
CLAIMED = "claimed"


def execute(
    run: Run, threads: int, children: Children | None = None, wait: bool = False
) -> dict[str, Any] | str | None:
    """Train (or resume) one run, evaluate it and write its record; ``None`` if it already has one.

    The run is claimed first (``RunClaim``): if another experiment command holds it, return
    ``CLAIMED`` (``wait=False``) or wait for it to finish (its record then exists)."""
    children = children or Children()
    if run.record_path.is_file():
        return None
    claim = RunClaim(run.output_dir)
    if not claim.try_acquire():
        if not wait:
            return CLAIMED
        print(f"[experiment] waiting for {run.name}: another experiment command is training it", flush=True)
        if not claim.wait(children.stop):
            raise RunStopped(f"run {run.name}: stopped while waiting for another experiment command")
    try:
        if run.record_path.is_file():  # the other command finished it meanwhile
            print(f"[experiment] done {run.name} (by another experiment command)", flush=True)
            return None
        return _train_and_record(run, threads, children)
    finally:
        claim.release()


def _train_and_record(run: Run, threads: int, children: Children) -> dict[str, Any]:
    """Train or resume ``run`` (claimed by this command) and write its record."""
    from .runs.checkpoints import latest_checkpoint, previous_run

    start = time.time()
    run.output_dir.mkdir(parents=True, exist_ok=True)
    command = run.command()
    finished, max_steps = _finished_steps(run.output_dir), run.max_steps()
    if finished is not None and finished > max_steps:
        raise ExperimentError(
            f"run {run.name}: {run.output_dir} holds a run trained to step {finished}, past this spec's "
            f"max_steps={max_steps}; give the spec another output_dir"
        )
    if finished is None or finished < max_steps:
        # Unfinished: resume it. Finished short of max_steps (a spec that shares its output_dir with
        # a shorter one): continue it from its last checkpoint, the way a longer study extends a study.
        if latest_checkpoint(run.output_dir):
            command += ["--resume_from_checkpoint", "latest"]
        elif finished is not None:
            raise ExperimentError(
                f"run {run.name}: {run.output_dir} finished at step {finished} < max_steps={max_steps} "
                f"and keeps no checkpoint to continue from; give the spec another output_dir"
            )
        elif previous_run(run.output_dir):
            command += ["--overwrite_output_dir", "true"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        env.setdefault("HF_HUB_OFFLINE", "1")
        print(f"[experiment] start {run.name}: {shlex.join(command)}", flush=True)
        segment_id, segment_start = _begin_segment(run.output_dir, command)
        with open(run.output_dir / "train.log", "a") as log:
            code = children.run(command, env, log)
        _end_segment(run.output_dir, segment_id, code, time.time() - segment_start)
        if code in (EXIT_INTERRUPTED, EXIT_CTRL_C) or (code < 0 and children.stop.is_set()):
            raise RunStopped(
                f"run {run.name} interrupted (exit {code}); re-run the command to resume it from its checkpoint"
            )
        if code != 0:
            raise ExperimentError(
                f"run {run.name} failed (exit {code}); see {run.output_dir / 'train.log'} and re-run to resume"
            )
    record = build_record(run, command)
    run.record_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = run.record_path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=1))
    temporary.replace(run.record_path)  # atomic: a record is complete or absent
    if not run.spec.keep_weights:
        import shutil

        for child in run.output_dir.glob("checkpoint-*"):
            shutil.rmtree(child, ignore_errors=True)
    print(f"[experiment] done {run.name}: {time.time() - start:.0f} s", flush=True)
    return record


def _begin_segment(output_dir: Path, command: list[str]) -> tuple[int, float]:
    """Write a training segment's provenance (commit, start time, command) *before* it runs.

    A segment (one training process; a resume is a new one) that is killed never reaches its
    end line, but its start line keeps what code it ran and when it began, so the record of a
    run resumed by a later process still names every commit that trained it.
    """
    started = time.time()
    segment_id = len(_segment_lines(output_dir / SEGMENTS))
    line = {
        "event": "start",
        "segment": segment_id,
        **git_commit(),
        "started_at": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(command),
    }
    with open(output_dir / SEGMENTS, "a") as segments:
        segments.write(json.dumps(line) + "\n")
    return segment_id, started


def _end_segment(output_dir: Path, segment_id: int, code: int, seconds: float) -> None:
    line = {"event": "end", "segment": segment_id, "exit": code, "seconds": seconds}
    with open(output_dir / SEGMENTS, "a") as segments:
        segments.write(json.dumps(line) + "\n")


def _segment_lines(path: Path) -> list[dict[str, Any]]:
    """The segment log's start lines (and the one-line-per-segment entries of older versions)."""
    if not path.is_file():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [entry for entry in entries if entry.get("event") != "end"]


def read_segments(output_dir: Path) -> list[dict[str, Any]]:
    """Every training segment of a run, oldest first: commit, start time, exit status and seconds.

    A segment whose process never wrote its end (killed with the session, say) is kept with
    ``exit`` None and ``seconds`` None: its time is unknown, and the record says so.
    """
    path = output_dir / SEGMENTS
    if not path.is_file():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ends = {entry["segment"]: entry for entry in entries if entry.get("event") == "end"}
    segments = []
    for entry in entries:
        if entry.get("event") == "end":
            continue
        if entry.get("event") != "start":  # a complete segment written by an older version at its end
            segments.append({k: v for k, v in entry.items() if k != "command"})
            continue
        end = ends.get(entry["segment"], {})
        segments.append(
            {
                "commit": entry.get("commit"),
                "dirty": entry.get("dirty"),
                "started_at": entry.get("started_at"),
                "exit": end.get("exit"),
                "seconds": end.get("seconds"),
            }
        )
    return segments


def build_record(run: Run, command: list[str]) -> dict[str, Any]:
    """What the analysis needs from a finished run (small: no weights, no per-prompt errors)."""
    import torch
    import transformers

    from . import __version__
    from .evaluation.loading import load_model as load_icl_model
    from .evaluation.predictions import errors_of, model_predictions
    from .evaluation.statistics import curve_with_interval

    out = run.output_dir
    state = json.loads((out / "trainer_state.json").read_text())
    segments = read_segments(out)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text()) if (out / "recipe.yaml").is_file() else {}
    model = load_icl_model(str(out))
    prompts, task = _eval_prompts(run.spec, model.config)
    errors = errors_of(task, model_predictions(model, prompts), prompts)
    history = state.get("log_history", [])
    eval_history = []
    for entry in history:
        keys = sorted(
            (k for k in entry if k.startswith("eval_error_at_k/")), key=lambda k: int(k.split("/")[1])
        )
        if keys:
            eval_history.append({"step": entry["step"], "curve": [entry[k] for k in keys]})
    train_log = [
        {k: v for k, v in entry.items() if not k.startswith("eval_")}
        for entry in history
        if "loss" in entry and "eval_loss" not in entry
    ]
    backbone = model.config.backbone_config
    return {
        "experiment": run.spec.name,
        "arm": run.arm,
        "seed": run.seed,
        "arm_overrides": run.spec.arms[run.arm],
        "command": shlex.join(command),
        "recipe": recipe,
        "max_steps": state.get("max_steps"),
        "global_step": state.get("global_step"),
        # The kernel training ran with (the recipe's); the reloaded model defaults to sdpa.
        "attn_implementation": recipe.get(
            "attn_implementation", getattr(backbone, "_attn_implementation", None)
        ),
        "icl_conml_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        # The commit of the last training segment (``segments``: every one, with its start and time).
        **({k: segments[-1][k] for k in ("commit", "dirty")} if segments else git_commit()),
        "segments": segments,
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # A refused attempt (exit 2: the training command refused to start, e.g. its folder was
        # locked by another process) trained nothing: its seconds are not the run's cost.
        "wall_seconds": sum(
            segment.get("seconds") or 0.0 for segment in segments if segment.get("exit") != 2
        ),
        # False when a segment was killed before it could write its time: wall_seconds is then a lower bound.
        "wall_seconds_complete": all(segment.get("seconds") is not None for segment in segments),
        "n_dims": model.config.n_dims,
        "eval": {
            "n_prompts": int(prompts.xs.shape[0]),
            "seed": run.spec.eval.seed,
            "eval_set": run.spec.eval.eval_set,
        },
        "final_curve": curve_with_interval(errors, run.spec.eval.bootstrap_samples, seed=0),
        "eval_history": eval_history,
        "train_log": train_log,
    }


def _eval_prompts(spec: Spec, config):
    """The prompts every run is evaluated on (the ones training evaluated on, at full length)."""
    from .data import Prompts
    from .evaluation.loading import load_eval_set
    from .tasks import get_task

    task = get_task(config.task, config.n_dims, **config.task_kwargs)
    if spec.eval.eval_set:
        prompts, _ = load_eval_set(spec.eval.eval_set)
        return prompts, task
    return Prompts.sample(task, spec.eval.n_prompts, config.n_positions, seed=spec.eval.seed), task


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity set (taskset, SLURM cpusets), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


@dataclass
class Outcome:
    """What ``run_all`` did: the runs that failed and those a stop request interrupted."""

    failures: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    not_started: list[str] = field(default_factory=list)


def run_all(
    spec: Spec,
    jobs: int,
    only_index: int | None = None,
    expected: dict[str, dict[str, Any]] | None = None,
    children: Children | None = None,
) -> Outcome:
    """Run every missing run (``jobs`` at a time, threads split between them).

    Every existing record is read and checked to be this spec's run first (``load_records``):
    a damaged or foreign record stops the study before anything trains. Runs another experiment
    command is training are left to the end and then waited for; after a stop request
    (``children``) no run starts."""
    children = children or Children()
    runs = spec.runs() if only_index is None else [spec.runs()[only_index]]
    done = load_records(spec, expected)
    todo = [run for run in runs if (run.arm, run.seed) not in done]
    print(f"[experiment] {spec.name}: {len(runs) - len(todo)} of {len(runs)} runs have records", flush=True)
    threads = max(1, usable_cpus() // max(1, jobs))
    # Import what records need now: a study runs for hours, and a module first imported after the
    # working tree moved to another commit would mix two versions of the package in this process.
    from . import evaluation  # noqa: F401

    outcome = Outcome()
    claimed: list[Run] = []

    def one(run: Run, wait: bool = False) -> None:
        if children.stop.is_set():
            outcome.not_started.append(run.name)
            return
        try:
            if execute(run, threads, children, wait) == CLAIMED:
                claimed.append(run)
        except RunStopped as stopped:
            outcome.interrupted.append(run.name)
            print(f"[experiment] interrupted {str(stopped).removeprefix('run ')}", flush=True)
        except Exception as error:  # one run's failure must not stop the others
            outcome.failures.append(
                f"{run.name}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
            )
            print(f"[experiment] FAILED {outcome.failures[-1]}", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))
    if claimed:  # trained by another experiment command: wait for them (their records end the wait)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(lambda run: one(run, wait=True), claimed))
    return outcome


def slurm_script(spec: Spec, spec_path: str) -> str:
    """A job array with one training run per task; each task skips a run that has a record.
    The tasks get the resolved records and run folders (the command line's overrides included)."""
    count = len(spec.runs())
    folders = f"--records_dir {shlex.quote(str(spec.records))} --output_dir {shlex.quote(str(spec.out))}"
    extra = "".join(f"#SBATCH --{key}={value}\n" for key, value in spec.slurm.items())
    logs = spec.out / "slurm"
    return (
        "#!/bin/bash\n"
        f"#SBATCH --job-name={spec.name}\n"
        f"#SBATCH --array=0-{count - 1}\n"
        f"#SBATCH --output={logs}/%A_%a.out\n"
        f"{extra}"
        "set -euo pipefail\n"
        f"cd {shlex.quote(str(Path.cwd()))}\n"
        f"python -m icl_conml.experiment {shlex.quote(spec_path)} {folders} "
        '--run_index "$SLURM_ARRAY_TASK_ID" --no_analysis\n'
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=command_name("python -m icl_conml.experiment", "icl_conml experiment"),
        description="Run and analyse a paired multi-seed study (plain ICL vs ConML arms).",
    )
    parser.add_argument(
        "spec",
        help="experiment spec YAML, or a packaged spec's name (lr_paper_cpu); format: docs/experiments.md",
    )
    parser.add_argument(
        "--records_dir",
        default=None,
        help="write and read records (and the analysis) here instead of the spec's records_dir: retrain a "
        "study from scratch (run folders go to DIR/runs unless --output_dir)",
    )
    parser.add_argument(
        "--output_dir", default=None, help="put the run folders here instead of the spec's output_dir"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time on this machine (threads split)")
    parser.add_argument(
        "--analyze_only", action="store_true", help="only build tables and plots from records"
    )
    parser.add_argument("--no_analysis", action="store_true", help="train only")
    parser.add_argument("--run_index", type=int, default=None, help="run only this run (SLURM array task)")
    parser.add_argument("--slurm", action="store_true", help="write a SLURM job array script and exit")
    parser.add_argument("--submit", action="store_true", help="with --slurm: submit it with sbatch")
    parser.add_argument("--dry_run", action="store_true", help="print each run's command and exit")
    return parser


@entry_point
def main(argv: list[str]) -> int:
    """``python -m icl_conml.experiment SPEC`` (``icl_conml experiment``); exit 1 if a run failed."""
    args = build_parser().parse_args(argv)
    spec = load_spec(args.spec, records_dir=args.records_dir, output_dir=args.output_dir)
    if args.jobs < 1:
        raise ExperimentError(f"--jobs {args.jobs} must be >= 1")
    if args.run_index is not None and not 0 <= args.run_index < len(spec.runs()):
        raise ExperimentError(f"--run_index {args.run_index} is outside 0..{len(spec.runs()) - 1}")
    expected = expected_settings(spec)  # every arm is a valid recipe, before anything trains
    if args.dry_run:
        done = load_records(spec, expected)
        for run in spec.runs():
            state = "done" if (run.arm, run.seed) in done else "todo"
            print(f"{state} {run.name}: {shlex.join(run.command())}")
        return 0
    if args.slurm:
        path = spec.out / "slurm" / f"{spec.name}.sbatch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(slurm_script(spec, args.spec))
        print(f"wrote {path} ({len(spec.runs())} array tasks)")
        if args.submit:
            return subprocess.run(["sbatch", str(path)]).returncode
        return 0
    outcome = Outcome()
    if not args.analyze_only:
        children = Children()
        children.install()  # stop signals reach the training runs, which checkpoint and stop
        try:
            outcome = run_all(spec, args.jobs, args.run_index, expected, children)
        finally:
            children.restore()
        if children.signal is not None:
            print(
                f"icl_conml: interrupted: {len(outcome.interrupted)} run(s) stopped, {len(outcome.not_started)} "
                f"not started; re-run the command to resume them from their checkpoints",
                file=sys.stderr,
            )
            return children.exit_code
    if not args.no_analysis and args.run_index is None:
        report = analyze(spec, expected=expected)
        print(f"[experiment] analysis written to {report}")
    if outcome.failures:
        failures = outcome.failures
        print(f"icl_conml: error: {len(failures)} run(s) failed: {'; '.join(failures)}", file=sys.stderr)
        return 1
    if outcome.interrupted:  # a training run was stopped from outside (a signal to it alone)
        print(
            f"icl_conml: interrupted: {', '.join(outcome.interrupted)} stopped; re-run the command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
