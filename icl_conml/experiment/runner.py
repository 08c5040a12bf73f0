"""Running a study: each run trained (or resumed) in its own process, claimed so that no two
experiment commands train it at once, stopped cleanly on a stop signal, and recorded.

``execute`` trains one run and writes its record; ``run_all`` runs every run without a record
(``jobs`` at a time); ``build_record`` is what the analysis reads of a finished run.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import EXIT_CTRL_C, EXIT_INTERRUPTED
from .analysis import load_records
from .processes import Children, RunClaim
from .records import ExperimentError
from .spec import Run, Spec

REPO_ROOT = Path(__file__).resolve().parents[2]
SEGMENTS = "experiment_segments.jsonl"


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
    from ..runs.checkpoints import latest_checkpoint, previous_run

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
    segment_id = len(read_segments(output_dir))
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

    from .. import __version__
    from ..evaluation.loading import load_model as load_icl_model
    from ..evaluation.predictions import errors_of, model_predictions
    from ..evaluation.statistics import curve_with_interval

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
    from ..data import Prompts
    from ..evaluation.loading import load_eval_set
    from ..tasks import get_task

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
    from .. import evaluation  # noqa: F401

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
