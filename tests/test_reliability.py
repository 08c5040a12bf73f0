"""Reliability under a hostile user and an unlucky cluster (issue 15), with real processes, real
signals and real damaged files: one run per output_dir, preemption that saves and resumes
exactly, only finite weights on disk, checkpoints checked before a resume."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_resume import RESUME_ARGS, TINY, _assert_identical, _env, _weights
from transformers import TrainerCallback

from icl_conml.arguments import RecipeError
from icl_conml.errors import EXIT_CTRL_C, EXIT_INTERRUPTED
from icl_conml.recipe_parser import parse_recipe
from icl_conml.runs import RunError
from icl_conml.runs import lock as run_lock
from icl_conml.runs.checkpoints import MANIFEST, check_checkpoint
from icl_conml.runs.record import read_history, read_status
from icl_conml.runs.storage import EXIT_STORAGE
from icl_conml.train import main

REPO = Path(__file__).resolve().parents[1]
# A run long enough never to finish during a test (it is always stopped early).
LONG = [*TINY, "--max_steps", "100000", "--save_steps", "50000", "--logging_steps", "1"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m icl_conml.train ARGS`` as a real process, stdout and stderr into ``log``; Ctrl-C
    reaches it as from a terminal even when the suite itself was started in the background (a
    shell's ``cmd &`` ignores SIGINT, and the children inherit that)."""
    with log.open("w") as stream:
        return subprocess.Popen(
            [sys.executable, "-m", "icl_conml.train", *args],
            cwd=REPO,
            env=_env(),
            stdout=stream,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def _logged_a_step(text: str) -> bool:
    """Whether a run's console output holds a training log line (``step 3/150: loss 4.9, ...``)."""
    return re.search(r"step [1-9]\d*/\d+: loss ", text) is not None


def _wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _finish(process: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _held(output_dir: Path) -> bool:
    try:
        return json.loads((output_dir / ".lock").read_text()).get("state") == "held"
    except (OSError, ValueError):
        return False


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("icl_conml: ")]


# ---- 1. one run per output_dir ----------------------------------------------------------------------------
def test_a_second_run_into_a_busy_output_dir_is_refused_and_a_dead_owner_is_reported(
    tmp_path, capsys, caplog
):
    out = tmp_path / "run"
    first = _start([*LONG, "--output_dir", str(out)], tmp_path / "first.log")
    try:
        # Before its first checkpoint: the old check (checkpoint folders only) let a second run in.
        _wait_for(lambda: _held(out), first, "the first run to take the lock")
        assert not list(out.glob("checkpoint-*"))
        for extra in ([], ["--overwrite_output_dir", "true"], ["--resume_from_checkpoint", "latest"]):
            assert main([*TINY, "--output_dir", str(out), "--seed", "1", *extra]) == 2
            [line] = _error_lines(capsys.readouterr().err)
            assert line.startswith(
                f"icl_conml: error: output_dir={str(out)!r} is in use by another run "
                f"(pid {first.pid} on host {socket.gethostname()}, started "
            ), line
            assert "wait for it to end, stop it, or choose another output_dir" in line
        _wait_for(
            lambda: _logged_a_step((tmp_path / "first.log").read_text()), first, "the first training step"
        )
        first.send_signal(signal.SIGKILL)  # dies holding the lock: its record still says "held"
    finally:
        _finish(first)
    assert _held(out)
    assert read_status(out)["status"] == "running"  # what a killed run leaves

    # The stale lock is reported, never silently taken: a warning naming the dead owner.
    assert main([*TINY, "--output_dir", str(out)]) == 0
    assert (
        f"taking over the lock of a run that ended without releasing it (pid {first.pid} on host"
        in caplog.text
    )
    assert json.loads((out / ".lock").read_text())["state"] == "released"
    segments = [e for e in read_history(out) if e["event"] == "start"]
    assert [e["pid"] for e in segments] == [first.pid, os.getpid()]


def test_a_lock_of_another_host_is_taken_only_once_it_stops_being_refreshed(tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    out.mkdir()
    record = {"state": "held", "pid": 4242, "host": "elsewhere", "started": "2026-01-01T00:00:00+00:00"}
    (out / ".lock").write_text(json.dumps(record))
    monkeypatch.setattr(run_lock, "STALE_AFTER_S", 1.0)
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.3)
    lock = run_lock.OutputDirLock(out)
    # Fresh and still refreshed by its owner: refused.
    import threading

    stop = threading.Event()

    def beat():
        while not stop.wait(0.1):
            os.utime(out / ".lock")

    owner = threading.Thread(target=beat)
    owner.start()
    try:
        with pytest.raises(RunError, match="is in use by a run on another host .pid 4242 on host elsewhere"):
            lock.acquire()
    finally:
        stop.set()
        owner.join()
    # No longer refreshed: taken over, with a warning.
    old = time.time() - 10
    os.utime(out / ".lock", (old, old))
    lock.acquire()
    try:
        assert (
            "taking over the lock of a run that ended without releasing it (pid 4242 on host elsewhere"
            in caplog.text
        )
    finally:
        lock.release()


def test_a_run_folder_problem_is_a_run_error_and_a_recipe_key_problem_a_recipe_error(tmp_path):
    """Both are user errors (exit 2); only the recipe's own keys make a ``RecipeError``."""
    from icl_conml.runs.resume import resolve_resume

    out = ["--output_dir", str(tmp_path / "run")]
    (tmp_path / "run").mkdir()
    nothing_saved = parse_recipe([*TINY, *out, "--resume_from_checkpoint", "latest"])
    with pytest.raises(RunError, match="holds no complete checkpoint") as raised:
        resolve_resume(nothing_saved)
    assert not isinstance(raised.value, RecipeError) and raised.value.exit_code == 2
    no_checkpoint_named = parse_recipe([*TINY, *out, "--resume_weights_only", "true"])
    with pytest.raises(
        RecipeError, match="resume_weights_only=true needs --resume_from_checkpoint"
    ) as raised:
        resolve_resume(no_checkpoint_named)
    assert not isinstance(raised.value, RunError) and raised.value.exit_code == 2


def test_a_read_only_output_dir_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root can write into a read-only folder")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main([*TINY, "--output_dir", str(out)]) == 2
    finally:
        out.chmod(0o755)
    [line] = _error_lines(capsys.readouterr().err)
    assert "is not writable (Permission denied)" in line


# ---- 2. preemption ----------------------------------------------------------------------------------------
def test_sigterm_saves_a_checkpoint_marks_the_run_interrupted_and_resumes_exactly(tmp_path):
    """The issue's scenario: with enable_jit_checkpoint the run used to log "finished" and write a
    final model. SIGTERM arrives while the run starts; it stops after step 1 with checkpoint-1."""
    reference = tmp_path / "reference"
    assert main([*RESUME_ARGS, "--output_dir", str(reference)]) == 0

    out = tmp_path / "preempted"
    log = tmp_path / "preempted.log"
    process = _start([*RESUME_ARGS, "--output_dir", str(out), "--enable_jit_checkpoint", "true"], log)
    try:
        _wait_for(lambda: "resolved recipe" in log.read_text(), process, "the first log line")
        process.send_signal(signal.SIGTERM)
    finally:
        code = _finish(process)
    text = log.read_text()
    assert code == EXIT_INTERRUPTED, text[-3000:]
    assert "Traceback" not in text and "finished" not in text
    [line] = _error_lines(text)
    assert line == (
        f"icl_conml: stopped by SIGTERM after step 1 of 12: saved {out / 'checkpoint-1'}, no final model; "
        f"resume with --resume_from_checkpoint latest (exit status 75)"
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert check_checkpoint(out / "checkpoint-1") is None and (out / "checkpoint-1" / MANIFEST).is_file()
    assert not (out / "model.safetensors").exists() and not (out / "trainer_state.json").exists()
    status = read_status(out)
    assert status["status"] == "interrupted" and status["step"] == 1 and status["signal"] == "SIGTERM"

    assert main([*RESUME_ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]) == 0
    _assert_identical(_weights(reference), _weights(out))
    assert read_status(out)["status"] == "finished"
    ends = [(e["status"], e["step"]) for e in read_history(out) if e["event"] == "end"]
    assert ends == [("interrupted", 1), ("finished", 12)]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT], ids=["SIGUSR1", "Ctrl-C"])
def test_a_signal_mid_training_stops_cleanly(tmp_path, signum):
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    process = _start([*LONG, "--output_dir", str(out), "--save_steps", "2"], log)
    try:
        _wait_for(lambda: (out / "checkpoint-2" / MANIFEST).is_file(), process, "checkpoint-2")
        process.send_signal(signum)
    finally:
        code = _finish(process)
    text = log.read_text()
    assert "Traceback" not in text and "finished" not in text, text[-3000:]
    [line] = _error_lines(text)
    status = read_status(out)
    assert status["status"] == "interrupted"
    assert not (out / "model.safetensors").exists()
    if signum == signal.SIGUSR1:
        assert code == EXIT_INTERRUPTED
        step = status["step"]
        assert line.startswith(f"icl_conml: stopped by SIGUSR1 after step {step} of 100000: saved")
        assert check_checkpoint(out / f"checkpoint-{step}") is None
    else:
        assert code == EXIT_CTRL_C
        assert line.startswith("icl_conml: interrupted (Ctrl-C) at step "), line
        assert "the last checkpoint is " in line and line.endswith(
            "resume with --resume_from_checkpoint latest"
        )
        assert status["signal"] == "SIGINT"
    assert json.loads((out / ".lock").read_text())["state"] == "released"


# ---- 3. only finite weights are saved ---------------------------------------------------------------------
def test_an_update_that_poisons_the_weights_is_stopped_before_it_is_saved(tmp_path, capsys):
    # lr=1e39 passes as a finite number but is inf in float32: step 1's loss and gradients are
    # finite, its update is not. The guard used to certify checkpoint-1 (NaN in 55 of 56 tensors).
    code = main([*TINY, "--max_steps", "3", "--learning_rate", "1e39", "--warmup_steps", "0",
                 "--lr_scheduler_type", "constant", "--output_dir", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    assert "Traceback" not in err
    [line] = _error_lines(err)
    assert "non-finite weights after the update of step 1:" in line
    assert "no checkpoint had been saved yet" in line
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "model.safetensors").exists()
    assert read_status(tmp_path)["status"] == "failed"


def test_every_saved_checkpoint_is_finite_when_the_update_fails_later(tmp_path, capsys):
    from icl_conml.recipe_parser import parse_recipe
    from icl_conml.train import build_trainer

    recipe = parse_recipe([*TINY, "--max_steps", "4", "--output_dir", str(tmp_path)])
    trainer = build_trainer(recipe)

    class PoisonAtStep3(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 2:  # the update of step 3
                with torch.no_grad():
                    next(trainer.model.parameters()).fill_(float("inf"))

    trainer.add_callback(PoisonAtStep3())
    from icl_conml.callbacks import NonFiniteLossError

    with pytest.raises(NonFiniteLossError) as raised:
        trainer.train()
    assert "non-finite weights after the update of step 3" in str(raised.value)
    assert f"the last good checkpoint is {tmp_path / 'checkpoint-2'}" in str(raised.value)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for checkpoint in tmp_path.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in _weights(checkpoint).values())


# ---- 4. checkpoint integrity ------------------------------------------------------------------------------
CKPT_ARGS = [*TINY, "--max_steps", "3", "--save_total_limit", "10", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 3-step run with checkpoint-1..3 (each with its manifest)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*CKPT_ARGS, "--output_dir", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated-weights": (
        lambda c: _truncate(c / "model.safetensors"),
        "fails its integrity check: model.safetensors is ",
        "were saved (truncated or rewritten); resume from an earlier checkpoint-N",
    ),
    "bit-flip": (
        lambda c: _flip_a_bit(c / "model.safetensors"),
        "fails its integrity check: model.safetensors does not match the sha256 recorded when it was saved",
        "(corrupted or replaced)",
    ),
    "stale-weights": (
        lambda c: (c / "model.safetensors").write_bytes(
            (c.parent / "checkpoint-1" / "model.safetensors").read_bytes()
        ),
        "model.safetensors does not match the sha256 recorded when it was saved",
        "",
    ),
    "empty-trainer-state": (
        lambda c: (c / "trainer_state.json").write_text("{}"),
        "trainer_state.json is unreadable or names no global_step (cut short or corrupted)",
        "",
    ),
    "truncated-optimizer": (
        lambda c: _truncate(c / "optimizer.pt"),
        "optimizer.pt is ",
        "(truncated or rewritten)",
    ),
    "no-optimizer": (
        lambda c: (c / "optimizer.pt").unlink(),
        "holds no optimizer.pt (optimizer/schedule state); pass --resume_weights_only true",
        "",
    ),
    "no-scheduler": (
        lambda c: (c / "scheduler.pt").unlink(),
        "holds no scheduler.pt (optimizer/schedule state); pass --resume_weights_only true",
        "",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_by_path_and_skipped_by_latest(damage, run_copy, capsys, caplog):
    spoil, *fragments = DAMAGE[damage]
    checkpoint = run_copy / "checkpoint-3"
    spoil(checkpoint)
    resume = ["--output_dir", str(run_copy), "--resume_from_checkpoint"]
    assert main([*CKPT_ARGS, *resume, str(checkpoint)]) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert line.startswith(f"icl_conml: error: resume_from_checkpoint={str(checkpoint)!r} "), line
    for fragment in fragments:
        assert fragment in line, line

    # "latest" skips it, says why, and resumes from checkpoint-2: the run ends as it did.
    before = _weights(run_copy)
    (run_copy / "model.safetensors").unlink()
    with caplog.at_level(logging.INFO, logger="icl_conml"):
        assert main([*CKPT_ARGS, *resume, "latest"]) == 0
    assert f"skipping {checkpoint}: it " in caplog.text
    assert f"resuming from {run_copy / 'checkpoint-2'}" in caplog.text
    _assert_identical(before, _weights(run_copy))


def test_weights_only_restart_keeps_the_schedule_at_its_step(run_copy, capsys, caplog):
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        for name in ("optimizer.pt", "scheduler.pt"):
            (run_copy / checkpoint / name).unlink()
    import shutil

    shutil.rmtree(run_copy / "checkpoint-3")
    history = json.loads((run_copy / "trainer_state.json").read_text())["log_history"]
    rate_at_3 = next(e["learning_rate"] for e in history if e.get("step") == 3 and "learning_rate" in e)
    args = [*CKPT_ARGS, "--output_dir", str(run_copy), "--resume_from_checkpoint", "latest"]
    assert main(args) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert (
        "no checkpoint in output_dir=" in line
        and "checkpoint-2: holds no optimizer.pt or scheduler.pt" in line
    )
    assert "pass --resume_weights_only true" in line
    assert main([*args, "--resume_weights_only", "true"]) == 0
    assert "resume_weights_only: starting a fresh optimizer at step 2" in caplog.text
    resumed = json.loads((run_copy / "trainer_state.json").read_text())["log_history"]
    assert (
        next(e["learning_rate"] for e in resumed if e.get("step") == 3 and "learning_rate" in e) == rate_at_3
    )
    [start] = [e for e in read_history(run_copy) if e["event"] == "start" and e["resumed_from"]]
    assert start["start_step"] == 2 and "resume_weights_only" not in start["settings"]


def test_a_checkpoint_of_another_model_without_manifest_is_refused_after_reading_its_keys(run_copy, capsys):
    from safetensors.torch import save_file

    checkpoint = run_copy / "checkpoint-3"
    (checkpoint / MANIFEST).unlink()  # as a checkpoint written before manifests existed
    weights = _weights(checkpoint)
    dropped = sorted(k for k in weights if ".h.0." in k)
    save_file({k: v for k, v in weights.items() if k not in dropped}, str(checkpoint / "model.safetensors"))
    code = main([*CKPT_ARGS, "--output_dir", str(run_copy), "--resume_from_checkpoint", str(checkpoint)])
    assert code == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert f"model.safetensors lacks {len(dropped)} of the model's {len(weights)} tensors" in line
    assert "it is not a checkpoint of this model" in line


def test_a_kill_during_the_final_save_does_not_rewrite_train_loss(tmp_path, caplog):
    """Case 7: kill -9 while the final model is written, then resume: nothing is left to train,
    and the train_loss recorded is the run's, not 0.0."""
    kill_at_final_save = (
        "import os, signal, sys\n"
        "from icl_conml.trainer import ConMLTrainer\n"
        "real = ConMLTrainer.save_model\n"
        "def save_model(self, output_dir=None, _internal_call=False):\n"
        "    if output_dir is None:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(self, output_dir, _internal_call)\n"
        "ConMLTrainer.save_model = save_model\n"
        "from icl_conml.train import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", kill_at_final_save, *CKPT_ARGS, "--output_dir", str(out)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    [trained] = [e for e in read_history(out) if e["event"] == "trained"]
    loss = trained["metrics"]["train_loss"]
    assert loss > 0
    with caplog.at_level(logging.INFO, logger="icl_conml"):
        assert main([*CKPT_ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]) == 0
    assert "nothing left to train" in caplog.text
    final = json.loads((out / "trainer_state.json").read_text())["log_history"][-1]
    assert final["train_loss"] == loss
    assert read_status(out)["metrics"]["train_loss"] == loss
    _assert_identical(_weights(out / "checkpoint-3"), _weights(out))


# ---- 5. honest resumes ------------------------------------------------------------------------------------
HONEST_ARGS = [*TINY, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "10", "--warmup_steps", "1",
               "--lr_scheduler_type", "cosine", "--seed", "7"]  # fmt: skip


@pytest.fixture(scope="module")
def half_run(tmp_path_factory) -> Path:
    """A 4-step cosine run stopped after checkpoint-2 (checkpoints 3 and 4 and the final model removed)."""
    import shutil

    out = tmp_path_factory.mktemp("half") / "run"
    assert main([*HONEST_ARGS, "--output_dir", str(out)]) == 0
    shutil.rmtree(out / "checkpoint-4")
    for name in ("model.safetensors", "trainer_state.json", "config.json"):
        (out / name).unlink()
    return out


@pytest.fixture
def half_copy(half_run, tmp_path) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(half_run, out)
    return out


EXPERIMENT_CHANGES = {
    "learning_rate": (["--learning_rate", "0.002"], "learning_rate 0.001 -> 0.002"),
    "batch": (
        ["--per_device_train_batch_size", "4"],
        "per_device_train_batch_size 8 -> 4, global_batch_size 8 -> 4",
    ),
    "accumulation": (
        ["--gradient_accumulation_steps", "2"],
        "gradient_accumulation_steps 1 -> 2, global_batch_size 8 -> 16",
    ),
    "seed": (["--seed", "8"], "seed 7 -> 8"),
    "data_seed": (["--data_seed", "3"], "data_seed None -> 3"),
    "lambda": (["--conml_lambda", "0.5"], "conml_lambda 0.02 -> 0.5"),
    "views": (["--conml_views", "shuffle"], "conml_views 'prefix_half' -> 'shuffle'"),
    "schedule": (["--lr_scheduler_type", "linear"], "lr_scheduler_type 'cosine' -> 'linear'"),
    "two-keys": (["--seed", "8", "--learning_rate", "0.01"], "learning_rate 0.001 -> 0.01, seed 7 -> 8"),
}


@pytest.mark.parametrize("change", list(EXPERIMENT_CHANGES))
def test_a_resume_that_changes_the_experiment_is_refused_naming_the_keys(change, half_copy, capsys):
    args, shown = EXPERIMENT_CHANGES[change]
    recipe_before = (half_copy / "recipe.yaml").read_text()
    code = main([*HONEST_ARGS, *args, "--output_dir", str(half_copy), "--resume_from_checkpoint", "latest"])
    assert code == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert (
        f"resuming {half_copy / 'checkpoint-2'} would change the experiment ({shown}; recorded in " in line
    ), line
    assert f"python -m icl_conml.train {half_copy / 'recipe.yaml'} --resume_from_checkpoint latest" in line
    assert (half_copy / "recipe.yaml").read_text() == recipe_before  # the record is not rewritten


def test_max_steps_changes_are_checked_against_the_schedule(half_copy, capsys):
    resume = ["--output_dir", str(half_copy), "--resume_from_checkpoint", "latest"]
    assert main([*HONEST_ARGS, "--max_steps", "1", *resume]) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert f"max_steps=1 is below the step of {half_copy / 'checkpoint-2'} (2)" in line

    assert main([*HONEST_ARGS, "--max_steps", "40", *resume]) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert (
        "max_steps 4 -> 40 re-plans the cosine learning-rate schedule from step 2 (the learning rate goes "
        in line
    )
    assert "pass --resume_extend_schedule true to accept that" in line

    assert main([*HONEST_ARGS, "--max_steps", "6", "--resume_extend_schedule", "true", *resume]) == 0
    [start] = [e for e in read_history(half_copy) if e["event"] == "start" and e["resumed_from"]]
    assert start["changes"]["max_steps"] == [4, 6] and start["start_step"] == 2
    assert set(start["changes"]) == {"max_steps", "output_dir"}  # (the run was copied to another folder)
    assert start["settings"]["max_steps"] == 6 and "resume_extend_schedule" not in start["settings"]
    assert "max_steps: 6" in (half_copy / "recipe.yaml").read_text()


def test_safe_changes_are_allowed_and_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    constant = [*HONEST_ARGS, "--lr_scheduler_type", "constant", "--output_dir", str(out)]
    assert main(constant) == 0
    resume = ["--resume_from_checkpoint", "latest"]
    assert (
        main([*constant, *resume, "--max_steps", "6", "--logging_steps", "1", "--save_total_limit", "3"]) == 0
    )
    starts = [e for e in read_history(out) if e["event"] == "start"]
    assert [e["start_step"] for e in starts] == [0, 4]
    assert starts[1]["changes"] == {
        "max_steps": [4, 6],
        "logging_steps": [100, 1],
        "save_total_limit": [10, 3],
    }
    assert starts[0]["settings"]["logging_steps"] == 100 and starts[1]["settings"]["logging_steps"] == 1
    assert read_status(out)["step"] == 6
    # recipe.yaml is the current segment's settings and loads back to the same recipe.
    from icl_conml.recipe_parser import parse_recipe

    saved = parse_recipe([str(out / "recipe.yaml")]).to_dict()
    assert saved == starts[1]["settings"]


# ---- 9. numbers and sizes checked up front ---------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model gets built: every check must come first."""
    import icl_conml.train as train_module

    def build_model(recipe):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr(train_module, "build_model", build_model)


UP_FRONT = {
    "lr-inf": (["--learning_rate", "inf"], "learning_rate=inf must be a finite number"),
    "lr-nan": (["--learning_rate", "nan"], "learning_rate=nan must be a finite number"),
    "weight-decay-nan": (["--weight_decay", "nan"], "weight_decay=nan must be a finite number"),
    "weight-decay-negative": (["--weight_decay", "-1"], "weight_decay=-1.0 must be >= 0"),
    "warmup-nan": (["--warmup_steps", "nan"], "warmup_steps=nan must be a finite number"),
    "beta1-nan": (["--adam_beta1", "nan"], "adam_beta1=nan must be a finite number"),
    "beta2-out-of-range": (["--adam_beta2", "1.5"], "adam_beta2=1.5 must be in [0, 1)"),
    "epsilon-inf": (["--adam_epsilon", "inf"], "adam_epsilon=inf must be a finite number"),
    "clip-nan": (["--max_grad_norm", "nan"], "max_grad_norm=nan must be a finite number"),
}


@pytest.mark.parametrize("case", list(UP_FRONT))
def test_bad_numbers_are_one_line_before_anything_is_built(case, tmp_path, capsys, no_model):
    args, fragment = UP_FRONT[case]
    assert main([*TINY, *args, "--output_dir", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    [line] = _error_lines(captured.err)
    assert fragment in line, line


# ---- 8/9. recipe files that are not recipes ---------------------------------------------------------------
NESTED_ALIASES = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]\n"
        for previous, name in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "lora_target_modules: *i\n"
)  # 9^9 = 387 million names once expanded

RECIPE_FILES = {
    "duplicate-key": (b"n_dims: 5\nseed: 1\nn_dims: 6\n", "sets 'n_dims' twice (lines 1 and 3); keep one"),
    "empty": (
        b"",
        "is empty; write key: value lines (see recipes/), or give no recipe to run the quickstart",
    ),
    "only-comments": (b"# nothing yet\n", "is empty"),
    "binary": (bytes(range(256)) * 4, "is not a text file (UTF-8 YAML); pass a YAML recipe"),
    "aliases": (
        NESTED_ALIASES.encode(),
        "uses the YAML anchor &a (line 1); recipes take no anchors or aliases",
    ),
    "huge-list": (
        ("lora_target_modules: [" + ", ".join(["c_attn"] * 5000) + "]\n").encode(),
        "lora_target_modules holds 5,000 items; a recipe value is at most 1,000 items",
    ),
    "huge-file": (
        b"# " + b"x" * 2_000_000 + b"\n",
        "is 2,000,003 bytes; a recipe is a short list of key: value lines",
    ),
    "long-wrong-type": (("n_dims: " + "9" * 5000 + "x\n").encode(), "has type str; expected int"),
}


@pytest.mark.parametrize("case", list(RECIPE_FILES))
def test_a_file_that_is_not_a_recipe_is_one_line(case, tmp_path, capsys, no_model):
    content, fragment = RECIPE_FILES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    started = time.monotonic()
    assert main([str(recipe), "--output_dir", str(tmp_path / "run")]) == 2
    assert time.monotonic() - started < 30
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    [line] = _error_lines(captured.err)
    assert fragment in line, line
    assert len(line) < 400  # the value is never printed whole


def test_sizes_that_cannot_fit_are_refused_with_the_estimate(tmp_path, capsys, no_model):
    assert main([*TINY, "--n_dims", "100000000", "--output_dir", str(tmp_path / "run")]) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert line.startswith("icl_conml: error: this recipe needs at least ")
    assert "GB of memory (" in line and "n_dims=100000000" in line and "but this machine has " in line


# ---- 2. the SLURM script requeues and resumes -------------------------------------------------------------
FAKE_SRUN = """#!/bin/bash
# srun on this machine: drop srun's options and run the task (one node)
while [[ $1 == -* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
# show hostnames: one host per line (this stand-in splits a comma-separated list); else log the call
[[ $1 == show && $2 == hostnames ]] && { tr ',' '\\n' <<<"$3"; exit 0; }
echo "$@" >> "$SCONTROL_LOG"
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_launch_slurm_stops_on_usr1_requeues_and_the_next_attempt_resumes(tmp_path):
    """recipes/launch.slurm with srun and scontrol stood in by scripts: USR1 (SLURM's warning
    before the end) reaches two real training processes under accelerate/torchrun as SIGTERM;
    both stop after the same step with one checkpoint, the job requeues itself, and the requeued
    attempt (SLURM_RESTART_COUNT=1) resumes it to the end."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "run"
    args = [*TINY, "--per_device_train_batch_size", "4", "--max_steps", "150", "--save_steps", "1000",
            "--logging_steps", "1", "--lr_scheduler_type", "constant", "--output_dir", str(out)]  # fmt: skip
    env = {
        **_env(),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "1",
        "SLURM_GPUS_ON_NODE": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "MASTER_PORT": str(_free_port()),
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
    }
    command = ["bash", "recipes/launch.slurm", "recipes/accelerate/cpu_2proc.yaml", *args]
    log = tmp_path / "attempt1.log"
    with log.open("w") as stream:
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _logged_a_step(log.read_text()), job, "the first training step")
        job.send_signal(signal.SIGUSR1)
    finally:
        code = _finish(job)
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert text.count("stopped by SIGTERM after step ") == 2, text[-4000:]  # both processes, one line each
    status = read_status(out)
    assert status["status"] == "interrupted" and 0 < status["step"] < 150
    assert check_checkpoint(out / f"checkpoint-{status['step']}") is None
    assert not (out / "model.safetensors").exists()

    env["SLURM_RESTART_COUNT"] = "1"
    env["MASTER_PORT"] = str(_free_port())
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert read_status(out)["status"] == "finished" and (out / "model.safetensors").is_file()
    starts = [e for e in read_history(out) if e["event"] == "start"]
    assert [e["start_step"] for e in starts] == [0, status["step"]] and starts[1]["world_size"] == 2


# ---- 8. a full disk --------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path, request):
    """A real small filesystem (tmpfs, ``request.param`` big, 200k by default): the run fills it."""
    folder = tmp_path / "small"
    folder.mkdir()
    size = getattr(request, "param", "200k")
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("needs to mount a small tmpfs (root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


# 100k fills up in torch.save (optimizer.pt), 150k in safetensors' own writer of checkpoint-2's
# weights, which raised SafetensorError (a traceback, exit 1) instead of OSError (issue 22.11).
@pytest.mark.parametrize("small_disk", ["100k", "150k", "200k"], indirect=True)
def test_a_full_disk_is_one_line_and_the_run_resumes_once_space_is_freed(small_disk, capsys):
    out = small_disk / "run"
    args = [*TINY, "--max_steps", "6", "--output_dir", str(out)]
    assert main(args) == EXIT_STORAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = _error_lines(err)
    assert line.startswith(
        f"icl_conml: error: no space left on device in output_dir={str(out)!r} (0.0 MB free"
    ), line
    assert line.endswith(
        "then resume with --resume_from_checkpoint latest"
        if "the newest complete checkpoint is" in line
        else "no checkpoint was saved. Free some space (or move output_dir), then start it again with "
        "--resume_from_checkpoint auto"
    ), line
    status = read_status(out)  # a final state even when the disk is full (it stayed "running")
    assert status["status"] == "failed" and status["error"] == line.removeprefix("icl_conml: error: ")

    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)  # space freed
    assert main([*args, "--resume_from_checkpoint", "auto"]) == 0
    assert read_status(out)["status"] == "finished" and (out / "model.safetensors").is_file()


def _fill(folder: Path) -> None:
    """Fill the filesystem of ``folder`` to the last byte."""
    with open(folder / "filler", "wb", buffering=0) as stream:
        with contextlib.suppress(OSError):
            while True:
                stream.write(b"\0" * 4096)
                stream.flush()


@pytest.mark.parametrize("small_disk", ["200k"], indirect=True)
def test_the_evaluation_on_a_full_disk_is_one_line_and_leaves_no_empty_results(
    small_disk, eval_folders, capsys
):
    from icl_conml.evaluation import main as evaluation_main

    _fill(small_disk)
    argv = ["--model", str(eval_folders / "model"), "--n_prompts", "16", "--bootstrap_samples", "10",
            "--baselines", "--output_dir", str(small_disk)]  # fmt: skip
    assert evaluation_main(argv) == EXIT_STORAGE
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    [line] = _error_lines(captured.err)
    assert line.startswith(f"icl_conml: error: no space left on device in --output_dir {str(small_disk)!r}")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no 0-byte results.json/.md


# ---- 6. the evaluation refuses what it cannot evaluate truthfully --------------------------------------
@pytest.fixture(scope="module")
def eval_folders(tmp_path_factory) -> Path:
    """Saved models: a real tiny ICLModel, a plain GPT-2, a mismatched ICLModel, a NaN one; eval sets."""
    from transformers import GPT2Config, GPT2Model

    from icl_conml import ICLConfig, ICLModel
    from icl_conml.eval_sets import build_eval_set

    root = tmp_path_factory.mktemp("eval_folders")
    config = ICLConfig(n_dims=5, n_positions=11, n_embd=16, n_layer=1, n_head=2, task="linear_regression")
    torch.manual_seed(0)
    ICLModel(config).save_pretrained(root / "model")
    GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2)).save_pretrained(root / "gpt2")
    ICLModel(config).save_pretrained(root / "mismatched")
    saved = json.loads((root / "mismatched" / "config.json").read_text())
    backbone = {**saved["backbone_config"], "n_layer": 2}  # the weights hold one layer
    (root / "mismatched" / "config.json").write_text(
        json.dumps({**saved, "n_layer": 2, "backbone_config": backbone})
    )
    poisoned = ICLModel(config)
    with torch.no_grad():
        poisoned.read_out.weight.fill_(float("nan"))
    poisoned.save_pretrained(root / "nan")
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text((root / "model" / "config.json").read_text())
    eval_set = build_eval_set("noisy_linear_regression", 5, 11, 8, seed=0, noise_std=0.5)
    eval_set.save_to_disk(str(root / "sets" / "intact"))
    # The same prompts relabelled as noiseless (metadata edited), and with one label changed.
    relabelled = eval_set.map(lambda row: {"task_kwargs": json.dumps({"noise_std": 0.0})})
    relabelled.save_to_disk(str(root / "sets" / "relabelled"))
    edited = eval_set.map(lambda row, i: {"ys": [y + (i == 3) for y in row["ys"]]}, with_indices=True)
    edited.save_to_disk(str(root / "sets" / "edited"))
    return root


EVALUATION_REFUSALS = {
    "plain-gpt2": (
        ["--model", "{root}/gpt2"],
        "holds a 'gpt2' model (config.json model_type), not an icl_conml",
    ),
    "missing-keys": (["--model", "{root}/mismatched"], "is not a trained ICLModel: its weights lack "),
    "no-weights": (
        ["--model", "{root}/no_weights"],
        "cannot load model '{root}/no_weights' (local directory)",
    ),
    "nan-weights": (["--model", "{root}/nan"], "holds NaN/inf in 1 of its "),
    "n_points-0": (["--n_points", "0"], "--n_points 0 must be >= 1"),
    "n_dims-0": (["--n_dims", "0"], "--n_dims 0 must be >= 1"),
    "threshold-nan": (["--threshold", "nan"], "--threshold nan must be a finite number >= 0"),
    "tolerance-inf": (["--relative_tolerance", "inf"], "--relative_tolerance inf must be a finite number"),
    "bootstrap-0": (["--bootstrap_samples", "0"], "--bootstrap_samples 0 must be >= 1"),
    "batch-0": (["--batch_size", "0"], "--batch_size 0 must be >= 1"),
    "negative-prompts": (["--n_prompts", "-5"], "--n_prompts -5 must be >= 1"),
    "huge-scale": (["--ood", "scale_x=1e308"], "the value must be between 1e-06 and 1e+06"),
    "infinite-noise": (["--ood", "noisy_y=inf"], "the value must be between 0 and 1e+06"),
    "too-many-prompts": (["--n_prompts", "1000000000"], "this evaluation needs at least "),
    "output-is-a-file": (["--output_dir", "{root}/model/config.json"], "is a file, not a folder"),
    "eval-set-relabelled": (["--eval_set", "{root}/sets/relabelled"], "does not match its fingerprint"),
    "eval-set-edited": (["--eval_set", "{root}/sets/edited"], "does not match its fingerprint"),
}


@pytest.mark.parametrize("case", list(EVALUATION_REFUSALS))
def test_the_evaluation_refuses_in_one_line(case, eval_folders, tmp_path, capsys):
    from icl_conml.evaluation import main as evaluation_main

    args, fragment = EVALUATION_REFUSALS[case]
    root = str(eval_folders)
    argv = [arg.replace("{root}", root) for arg in args]
    if "--model" not in argv:
        argv = ["--model", f"{root}/model", *argv]
    if "--task" not in argv and "--eval_set" in argv:
        argv += ["--task", "noisy_linear_regression"]
    if "--output_dir" not in argv:
        argv += ["--output_dir", str(tmp_path / "out")]
    started = time.monotonic()
    assert evaluation_main([*argv, "--baselines"]) == 2
    assert time.monotonic() - started < 60
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    [line] = _error_lines(captured.err)
    assert fragment.replace("{root}", root) in line, line
    assert not (tmp_path / "out" / "results.json").exists()


def test_an_intact_eval_set_is_evaluated(eval_folders, tmp_path, capsys):
    from icl_conml.evaluation import main as evaluation_main

    root = eval_folders
    argv = ["--model", str(root / "model"), "--eval_set", str(root / "sets" / "intact"), "--task",
            "noisy_linear_regression", "--baselines", "--output_dir", str(tmp_path)]  # fmt: skip
    assert evaluation_main(argv) == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "results.json").is_file()


# ---- issue 22: run folders from others, lost locks, clobbered finals, silent failures ---------------------
def test_a_run_never_writes_through_a_symbolic_link_in_its_folder(finished_run, tmp_path, capsys):
    """Links planted where a run writes (its own files and the Trainer's) are refused in one line
    naming the link, before anything is written; their targets stay as they were."""
    import shutil

    victim = tmp_path / "victim.txt"
    cases = {  # where the link is planted: the run's lock and recipe, its record, a Trainer file
        ".lock": [],
        "recipe.yaml": [],
        "run_history.jsonl": ["--resume_from_checkpoint", "latest"],
        "checkpoint-3/trainer_state.json": [
            "--resume_from_checkpoint",
            "latest",
            "--max_steps",
            "4",
            "--lr_scheduler_type",
            "constant",
        ],  # fmt: skip
        "model.safetensors": ["--overwrite_output_dir", "true"],
    }
    for name, extra in cases.items():
        out = tmp_path / name.replace("/", "_")
        if name.startswith(("run_", "checkpoint-", "model.")):
            shutil.copytree(finished_run, out)
            (out / name).unlink()
        else:
            out.mkdir()
        victim.write_text("precious\n")
        (out / name).symlink_to(victim)
        assert main([*CKPT_ARGS, "--output_dir", str(out), *extra]) == 2, name
        [line] = _error_lines(capsys.readouterr().err)
        assert line.startswith(
            f"icl_conml: error: {str(out / name)!r} is a symbolic link (to {str(victim)!r})"
        )
        assert line.endswith(
            "never writes through a link in a run folder: remove the link (or choose another output_dir)"
        )
        assert victim.read_text() == "precious\n", name


def test_the_project_writes_open_no_link(tmp_path):
    """The writers themselves, where a link appears after the folder was checked."""
    from icl_conml.runs import files as run_files
    from icl_conml.runs.checkpoints import write_manifest

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "history.jsonl").symlink_to(victim)
    with pytest.raises(run_files.LinkInRunFolder, match="history.jsonl' is a symbolic link"):
        run_files.append_line(tmp_path / "history.jsonl", "{}")
    (tmp_path / ".status.json.tmp").symlink_to(victim)  # the temporary file of an atomic write
    run_files.write_text(tmp_path / "status.json", "{}")
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / "weights").write_bytes(b"w")
    (checkpoint / ".manifest.json.tmp").symlink_to(victim)
    write_manifest(checkpoint)
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "status.json").read_text() == "{}" and not (tmp_path / "status.json").is_symlink()


def test_deleting_the_lock_of_a_live_run_lets_no_second_run_in(tmp_path, capsys, caplog):
    """The lock is on the folder itself: deleting .lock used to let an --overwrite_output_dir run
    delete a live run's checkpoints (both exited 0). The live run writes its record again."""
    import re

    out = tmp_path / "run"
    log = tmp_path / "first.log"
    # No rotation (save_total_limit): checkpoint-2 can only go if the refused runs delete it.
    first = _start(
        [*LONG, "--output_dir", str(out), "--save_steps", "2", "--save_total_limit", "100000"], log
    )
    try:
        _wait_for(lambda: (out / "checkpoint-2" / MANIFEST).is_file(), first, "checkpoint-2")
        (out / ".lock").unlink()
        for extra in (["--overwrite_output_dir", "true"], ["--resume_from_checkpoint", "auto"]):
            assert main([*TINY, "--output_dir", str(out), *extra]) == 2
            [line] = _error_lines(capsys.readouterr().err)
            # (the record is gone until the live run's next checkpoint writes it again)
            assert re.fullmatch(
                rf"icl_conml: error: output_dir={re.escape(repr(str(out)))} is in use by another run "
                rf"\((its \.lock record was deleted|pid {first.pid} on host .*)\); wait for it to end, stop it, "
                rf"or choose another output_dir",
                line,
            ), line
        assert (out / "checkpoint-2" / MANIFEST).is_file()
        _wait_for(lambda: _held(out), first, "the live run to write its lock record again")
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGTERM)
        code = _finish(first)
    assert code == EXIT_INTERRUPTED, log.read_text()[-3000:]
    assert "was deleted or replaced while this run holds the folder; writing it again" in log.read_text()
    assert json.loads((out / ".lock").read_text())["state"] == "released"


def test_an_unfinished_overwrite_leaves_no_old_model_and_the_evaluation_refuses_it(
    finished_run, eval_folders, tmp_path, capsys
):
    import shutil

    from icl_conml.evaluation import main as evaluation_main

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    # The new run fails at its first step (exit 3): the old run's final files went before it trained.
    assert (
        main(
            [*CKPT_ARGS, "--output_dir", str(out), "--overwrite_output_dir", "true", "--conml_lambda", "1e30"]
        )
        == 3
    )
    for name in ("model.safetensors", "trainer_state.json", "config.json", "README.md", "training_args.bin"):
        assert not (out / name).exists(), name
    assert not list(out.glob("checkpoint-*")) and read_status(out)["status"] == "failed"
    capsys.readouterr()
    assert evaluation_main(["--model", str(out), "--output_dir", str(tmp_path / "r")]) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert (
        f"model {str(out)!r} is a training run that has not finished (run_status.json: failed at step 0)"
        in line
    )

    # A folder whose run has not finished is refused; --allow_unfinished insists.
    model = tmp_path / "model"
    shutil.copytree(eval_folders / "model", model)
    (model / "run_status.json").write_text(json.dumps({"status": "interrupted", "step": 40}))
    argv = ["--model", str(model), "--n_prompts", "16", "--bootstrap_samples", "10", "--baselines",
            "--output_dir", str(tmp_path / "results")]  # fmt: skip
    assert evaluation_main(argv) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert line == (
        f"icl_conml: error: model {str(model)!r} is a training run that has not finished (run_status.json: "
        f"interrupted at step 40): its final model may be missing or an earlier run's; evaluate one of its "
        f"checkpoint-N folders, finish the run (--resume_from_checkpoint latest), or pass --allow_unfinished "
        f"true to evaluate it anyway"
    )
    assert not (tmp_path / "results" / "results.json").exists()
    assert evaluation_main([*argv, "--allow_unfinished", "true"]) == 0
    assert (tmp_path / "results" / "results.json").is_file()


def test_auto_starts_a_run_whose_only_checkpoints_were_cut_short(finished_run, tmp_path, caplog):
    """kill -9 while the first checkpoint was written: a requeue with auto used to fail for ever."""
    import shutil

    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(finished_run / "checkpoint-1", out / "checkpoint-1")
    (out / "checkpoint-1" / "trainer_state.json").unlink()  # the last file of a save
    (out / "checkpoint-1" / MANIFEST).unlink()
    with caplog.at_level(logging.INFO, logger="icl_conml"):
        assert main([*CKPT_ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "auto"]) == 0
    assert (
        f"resume_from_checkpoint=auto: every checkpoint in {out} was cut short before it was complete "
        f"(checkpoint-1: holds no trainer_state.json (the save was cut short)); starting the run from step 0"
        in caplog.text
    )
    [start] = [e for e in read_history(out) if e["event"] == "start"]
    assert start["start_step"] == 0 and start["resumed_from"] is None
    _assert_identical(_weights(finished_run), _weights(out))


def test_latest_prefers_verified_checkpoints_and_counts_only_checkpoint_folders(run_copy, capsys, caplog):
    # Only folders named exactly checkpoint-<int>: a file and a backup folder are not checkpoints.
    import shutil

    from icl_conml.runs.checkpoints import latest_checkpoint

    (run_copy / "checkpoint-40").write_text("not a checkpoint")
    shutil.copytree(run_copy / "checkpoint-3", run_copy / "checkpoint-40_backup")
    assert latest_checkpoint(run_copy) == str(run_copy / "checkpoint-3")

    # A newer checkpoint without a manifest comes after the verified ones, and is said to be unverified.
    (run_copy / "checkpoint-3" / MANIFEST).unlink()
    assert latest_checkpoint(run_copy) == str(run_copy / "checkpoint-2")
    assert f"skipping {run_copy / 'checkpoint-3'}: it has no manifest.json (unverified" in caplog.text
    for step in (1, 2):
        (run_copy / f"checkpoint-{step}" / MANIFEST).unlink()
    caplog.clear()
    assert latest_checkpoint(run_copy) == str(run_copy / "checkpoint-3")
    assert f"{run_copy / 'checkpoint-3'} is unverified: it has no manifest.json" in caplog.text

    # Without a manifest, a damaged RNG state used to give a traceback on every resume: skipped now.
    rng = run_copy / "checkpoint-3" / "rng_state.pth"
    data = bytearray(rng.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the saved CPU generator state
    rng.write_bytes(bytes(data))
    caplog.clear()
    (run_copy / "model.safetensors").unlink()
    with caplog.at_level(logging.INFO, logger="icl_conml"):
        assert main([*CKPT_ARGS, "--output_dir", str(run_copy), "--resume_from_checkpoint", "latest"]) == 0
    assert f"skipping {run_copy / 'checkpoint-3'}: it fails its check: rng_state.pth" in caplog.text
    assert f"resuming from {run_copy / 'checkpoint-2'}" in caplog.text


def test_an_infinite_gradient_norm_stops_the_run_although_clipping_hides_it(tmp_path, capsys):
    """conml_lambda=1e30: grad_norm inf at every step, clipped to gradients of 0: nothing was ever
    learned and the run exited 0 "finished"."""
    assert main([*TINY, "--conml_lambda", "1e30", "--output_dir", str(tmp_path)]) == 3
    [line] = _error_lines(capsys.readouterr().err)
    assert line.startswith("icl_conml: error: non-finite loss at step 1 (") and "grad_norm=inf" in line
    assert not list(tmp_path.glob("checkpoint-*")) and read_status(tmp_path)["status"] == "failed"


def test_a_diverged_checkpoint_is_not_called_good_and_the_advice_is_accepted(tmp_path, capsys):
    """lr=1e30 after a warm-up step: checkpoint-1 (the warm-up's lr 0) is good; checkpoint-2 holds
    finite but diverged weights, whose loss at step 3 is NaN. The advice used to be refused."""
    args = [*TINY, "--max_steps", "4", "--learning_rate", "1e30", "--warmup_steps", "1",
            "--lr_scheduler_type", "constant_with_warmup", "--output_dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 3
    [line] = _error_lines(capsys.readouterr().err)
    good, bad = tmp_path / "checkpoint-1", "checkpoint-2"
    assert (
        f"the last good checkpoint is {good} ({bad} (its weights gave a non-finite loss at step 3) is not)"
        in line
    )
    assert line.endswith(
        f"resume with --resume_from_checkpoint {good} --learning_rate 1e+29 --resume_allow_changes learning_rate "
        f"(the change is recorded in run_history.jsonl)"
    )
    resume = [*args, "--resume_from_checkpoint", str(good), "--learning_rate", "0.001"]
    assert main(resume) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert "would change the experiment (learning_rate 1e+30 -> 0.001;" in line
    assert (
        "change it on purpose with --resume_allow_changes learning_rate (recorded in run_history.jsonl)"
        in line
    )
    assert main([*resume, "--resume_allow_changes", "learning_rate"]) == 0
    start = [e for e in read_history(tmp_path) if e["event"] == "start"][-1]
    assert start["start_step"] == 1 and start["changes"]["learning_rate"] == [1e30, 0.001]
    assert read_status(tmp_path)["status"] == "finished"


def test_the_same_global_batch_split_otherwise_resumes(tmp_path, capsys):
    """Another split of the run's global batch (what another number of processes needs) resumes;
    another global batch is refused with the per-device size that keeps it."""
    args = [*TINY, "--max_steps", "4", "--save_steps", "2", "--lr_scheduler_type", "constant",
            "--output_dir", str(tmp_path)]  # fmt: skip
    assert main([*args, "--conml_lambda", "0", "--max_steps", "2"]) == 0
    resume = [*args, "--conml_lambda", "0", "--resume_from_checkpoint", "latest"]
    assert main([*resume, "--per_device_train_batch_size", "4"]) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert "(per_device_train_batch_size 8 -> 4, global_batch_size 8 -> 4;" in line
    assert (
        "to keep the run's global batch of 8 prompts on 1 process(es), pass --per_device_train_batch_size 8;"
        in line
    )
    assert main([*resume, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]) == 0
    start = [e for e in read_history(tmp_path) if e["event"] == "start"][-1]
    assert start["changes"]["per_device_train_batch_size"] == [8, 4] and start["global_batch_size"] == 8


def test_damaged_manifests_and_pickles_are_named(run_copy, capsys):
    from icl_conml.runs.checkpoints import write_manifest

    # A flipped digit in the manifest is the manifest's problem, not the weights'.
    manifest = run_copy / "checkpoint-3" / MANIFEST
    text = manifest.read_text()
    digest = json.loads(text)["files"]["model.safetensors"]["sha256"]
    manifest.write_text(text.replace(digest, ("0" if digest[0] != "0" else "1") + digest[1:]))
    assert check_checkpoint(run_copy / "checkpoint-3") == (
        "manifest.json itself is corrupted (its own checksum does not match; the other files were not compared)"
    )

    # A pickle payload (with a manifest written for it) is one line naming the file, never run.
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    checkpoint = run_copy / "checkpoint-2"
    torch.save({"state": Payload()}, checkpoint / "optimizer.pt")
    write_manifest(checkpoint)
    assert main([*CKPT_ARGS, "--output_dir", str(run_copy), "--resume_from_checkpoint", str(checkpoint)]) == 2
    [line] = _error_lines(capsys.readouterr().err)
    assert line.startswith(
        f"icl_conml: error: resume_from_checkpoint={str(checkpoint)!r} fails its integrity check: optimizer.pt "
        f"holds more than tensors (torch.load with weights_only refuses it"
    ), line


def test_a_schedule_refused_during_warm_up_names_rates_that_differ(tmp_path, capsys):
    args = [*TINY, "--max_steps", "4", "--save_steps", "2", "--warmup_steps", "3", "--lr_scheduler_type",
            "cosine", "--learning_rate", "0.0002", "--output_dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    assert main([*args, "--max_steps", "8", "--resume_from_checkpoint", str(tmp_path / "checkpoint-2")]) == 2
    [line] = _error_lines(capsys.readouterr().err)
    # At step 2 both plans are in their warm-up (0.000133): the first step where they part is named.
    assert (
        "re-plans the cosine learning-rate schedule from step 2 (the learning rate at step 4 goes from 0 to 0.000181)"
        in line
    ), line
