"""No run is lost: kill -9 and resume bit-identically, stop on NaN keeping the last good checkpoint,
never train over a finished run by accident, never unpickle untrusted data when loading."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from icl_conml.callbacks import NonFiniteLossError
from icl_conml.data import PromptSampler
from icl_conml.recipe_parser import parse_recipe
from icl_conml.runs.checkpoints import is_complete, latest_checkpoint
from icl_conml.train import build_sampler, build_trainer, main

REPO = Path(__file__).resolve().parents[1]

# ConML on with data-drawn views (random subsets) and probes: resuming must restore both.
RESUME_ARGS = [
    "--n_dims", "5", "--n_points", "11", "--n_embd", "64", "--n_layer", "4", "--n_head", "4",
    "--per_device_train_batch_size", "32", "--learning_rate", "0.001", "--warmup_steps", "3",
    "--lr_scheduler_type", "cosine", "--max_steps", "12", "--save_steps", "3", "--save_total_limit", "10",
    "--logging_steps", "3", "--eval_n_prompts", "0", "--seed", "7",
    "--conml_lambda", "0.1", "--conml_views", "random_subset", "--conml_subset_min", "0.3",
    "--conml_subset_max", "0.7", "--conml_num_probes", "2",
    "--report_to", "none", "--disable_tqdm", "true",
]  # fmt: skip


def _env() -> dict[str, str]:
    # As many torch threads as this process (conftest: 1): the same reduction order in every run.
    threads = str(torch.get_num_threads())
    return {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": threads}


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "icl_conml.train", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"tensors differ after resuming: {different[:5]}"


def test_kill_9_then_resume_gives_bit_identical_weights(tmp_path):
    # The uninterrupted run and the resume by path run in this process (one torch thread, as in
    # the subprocesses); the killed run and the "latest" resume are real CLI processes.
    reference = tmp_path / "reference"
    assert main([*RESUME_ARGS, "--output_dir", str(reference)]) == 0

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "icl_conml.train", *RESUME_ARGS, "--output_dir", str(killed)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not is_complete(killed / "checkpoint-3") and process.poll() is None:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill: it must be killed mid-run"
    assert not (killed / "model.safetensors").exists()
    last = latest_checkpoint(killed)
    assert last is not None and int(last.rsplit("-", 1)[1]) < 12

    # Resume by explicit path, in a copy of the killed run.
    by_path = tmp_path / "by_path"
    shutil.copytree(killed, by_path)
    by_path_args = ["--output_dir", str(by_path), "--resume_from_checkpoint", str(by_path / Path(last).name)]
    assert main([*RESUME_ARGS, *by_path_args]) == 0
    _assert_identical(_weights(reference), _weights(by_path))

    # Resume "latest" in the killed folder itself, with a checkpoint left half-written by a kill
    # during saving (trainer_state.json, the last file, cut short): it must be skipped, then rewritten.
    half_written = killed / f"checkpoint-{int(last.rsplit('-', 1)[1]) + 3}"
    if not half_written.exists():
        shutil.copytree(last, half_written)
    (half_written / "trainer_state.json").write_text('{"best_global_step": null, "global_st')
    assert latest_checkpoint(killed) == last
    resumed = _train(*RESUME_ARGS, "--output_dir", str(killed), "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stderr
    _assert_identical(_weights(reference), _weights(killed))
    _assert_identical(_weights(reference / "checkpoint-12"), _weights(killed / "checkpoint-12"))


class _CorruptStep(PromptSampler):
    """The real prompt stream, with one label of one step made NaN (a corrupted data source)."""

    bad_step = 4  # 0-based data step: optimizer step 5

    def global_batch(self, step: int) -> dict[str, torch.Tensor]:
        batch = super().global_batch(step)
        if step == self.bad_step:
            batch["ys"][0, -1] = float("nan")
        return batch


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    recipe = parse_recipe(
        [*RESUME_ARGS, "--n_embd", "32", "--n_layer", "2", "--n_head", "2", "--save_steps", "2",
         "--output_dir", str(tmp_path)]
    )  # fmt: skip
    real = build_sampler(recipe)
    sampler = _CorruptStep(
        real.task, real.curriculum, real.global_batch_size, real.seed, conml_sampling=real.conml_sampling
    )
    trainer = build_trainer(recipe, train_dataset=sampler)
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.train()
    message = str(raised.value)
    assert "non-finite loss at step 5" in message
    for component in ("icl_loss=nan", "conml_loss=", "d_in=", "d_out=", "loss=nan", "grad_norm=nan"):
        assert component in message
    # The NaN came from the prompts, not the weights: checkpoint-4, which met them, is still good.
    assert "the step's prompts hold NaN/inf: check the data" in message
    assert f"the last good checkpoint is {tmp_path / 'checkpoint-4'}. Fix the data" in message
    assert "\n" not in message
    # Nothing of step 5 reached a checkpoint, and the weights in memory are still those of step 4.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    saved = _weights(tmp_path / "checkpoint-4")
    assert all(torch.isfinite(t).all() for t in saved.values())
    live = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert all(torch.equal(saved[k], live[k]) for k in saved)


def test_diverging_run_exits_with_one_line_naming_step_and_components(tmp_path):
    # A learning rate of 1e4 overflows the gradient at step 2 (step 1 is saved).
    done = _train(
        *RESUME_ARGS, "--n_embd", "32", "--n_layer", "2", "--n_head", "2", "--save_steps", "1",
        "--learning_rate", "1e4", "--warmup_steps", "0", "--lr_scheduler_type", "constant",
        "--output_dir", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("icl_conml: error:")]
    assert "non-finite loss at step 2 (" in line
    for component in ("icl_loss=", "conml_loss=", "d_in=", "d_out=", "grad_norm=nan"):
        assert component in line
    # checkpoint-1 is finite but diverged (its loss at step 2 is ~1e18): it is not called good.
    assert re.search(
        r"no checkpoint is known to be good \(checkpoint-1 \(its weights gave loss [0-9.e+]+ at step 2, over "
        r"100x the run's lowest [0-9.]+: exploding\) is not\)",
        line,
    ), line
    assert line.endswith(
        "start over with a lower learning rate (--learning_rate 1000 --overwrite_output_dir true)"
    )
    assert not (tmp_path / "checkpoint-2").exists() and not (tmp_path / "model.safetensors").exists()


TINY = [
    "--n_embd", "16", "--n_layer", "1", "--n_head", "2", "--per_device_train_batch_size", "8",
    "--max_steps", "2", "--save_steps", "1", "--eval_n_prompts", "0", "--report_to", "none",
    "--disable_tqdm", "true",
]  # fmt: skip


def test_a_finished_run_is_never_overwritten_by_accident(tmp_path, capsys):
    assert main([*TINY, "--output_dir", str(tmp_path)]) == 0
    before = _weights(tmp_path)
    capsys.readouterr()

    assert main([*TINY, "--output_dir", str(tmp_path), "--seed", "1"]) == 2
    error = capsys.readouterr().err
    assert f"output_dir={str(tmp_path)!r} already holds a run (checkpoint-1, checkpoint-2" in error
    assert "--resume_from_checkpoint latest" in error and "--overwrite_output_dir true" in error
    _assert_identical(before, _weights(tmp_path))

    # Resuming a finished run is allowed (nothing left to do: the weights stay).
    assert main([*TINY, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "true"]) == 0
    _assert_identical(before, _weights(tmp_path))

    # Overwriting starts over: the old checkpoints go, so "latest" cannot pick one of them.
    assert main([*TINY, "--output_dir", str(tmp_path), "--seed", "1", "--overwrite_output_dir", "true"]) == 0
    after = _weights(tmp_path)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # The saved recipe holds no run control: re-running it must not overwrite or resume.
    saved = (tmp_path / "recipe.yaml").read_text()
    assert "overwrite_output_dir" not in saved and "resume_from_checkpoint" not in saved


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    assert main([*TINY, "--output_dir", str(tmp_path)]) == 0
    capsys.readouterr()
    code = main(
        [*TINY, "--n_embd", "32", "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "was trained with n_embd=16 but the recipe says n_embd=32" in error
    assert str(tmp_path / "recipe.yaml") in error
    code = main(
        [*TINY, "--activation_function", "gelu_new", "--output_dir", str(tmp_path),
         "--resume_from_checkpoint", "latest"]
    )  # fmt: skip
    assert code == 2  # TINY names no recipe: it ran the quickstart's fused gelu_pytorch_tanh
    error = capsys.readouterr().err
    assert (
        "was trained with activation_function='gelu_pytorch_tanh' but the recipe says activation_function='gelu_new'"
        in error
    )


def test_loading_never_unpickles(tmp_path, monkeypatch, capsys):
    """Weights are safetensors; every torch.load of a resume (optimizer, scheduler, RNG) is
    weights_only=True, and training_args.bin (a pickle) is never read back."""
    assert main([*TINY, "--output_dir", str(tmp_path)]) == 0
    checkpoint = tmp_path / "checkpoint-1"
    assert (checkpoint / "model.safetensors").is_file() and not list(checkpoint.glob("pytorch_model*.bin"))
    loads: list[tuple[str, object]] = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):  # the real torch.load, recording what it is asked
        loads.append((str(f), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    shutil.rmtree(tmp_path / "checkpoint-2")
    assert main([*TINY, "--output_dir", str(tmp_path), "--resume_from_checkpoint", str(checkpoint)]) == 0
    names = sorted(Path(f).name for f, _ in loads)
    # Each once by the checkpoint check (checkpoints.check_checkpoint), once by the Trainer.
    assert names == ["optimizer.pt", "optimizer.pt", "rng_state.pth", "rng_state.pth", "scheduler.pt",
                     "scheduler.pt"], names  # fmt: skip
    assert all(weights_only is True for _, weights_only in loads), loads


@pytest.mark.slow
def test_two_processes_stop_together_on_a_non_finite_loss(tmp_path):
    """The NaN flag is reduced across processes: both stop at the same step, nobody hangs."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "icl_conml.train", *RESUME_ARGS, "--n_embd", "32", "--n_layer", "2", "--n_head", "2",
         "--per_device_train_batch_size", "8", "--save_steps", "1", "--learning_rate", "1e4",
         "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--output_dir", str(tmp_path)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode != 0
    # Both processes write to one stderr pipe, so their lines may interleave: count messages, not lines.
    steps = re.findall(r"icl_conml: error: non-finite loss at step (\d+) \(", done.stderr)
    assert steps == ["2", "2"], done.stderr[-3000:]
    assert (tmp_path / "checkpoint-1").is_dir() and not (tmp_path / "checkpoint-2").exists()
