"""Scale-out through Accelerate: real 2-process launches on CPU (gloo) train exactly like one process.

The global batch of a step is a function of (seed, step) and each process takes its slice;
ConML's negatives are all-gathered across processes. So DDP, ZeRO-2 and ZeRO-3 on 2 processes
must log the same icl_loss, conml_loss, d_in and d_out as 1 process holding the whole batch,
at every step (gradients included). Also: ZeRO-3 saves full weights, a ZeRO-2 run resumes on
its curve, the SLURM launcher's commands for a fake 2-node allocation run, the GPU check
dry-runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from icl_conml import ICLModel
from icl_conml.arguments import ICLTrainingArguments
from icl_conml.recipe_parser import parse_recipe
from icl_conml.train import build_eval_prompts, build_model
from icl_conml.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate"
GLOBAL_BATCH = 8
STEPS = 4
# ConML on, in its InfoNCE form: each view must find its own anchor among the anchors of the
# whole global batch, so the loss tells cross-process negatives (8 tasks, about log 8 at
# initialisation) from local ones (4 tasks, log 4) and a wrong row offset from the right one.
TINY_RECIPE = {
    "task": "linear_regression", "n_dims": 5, "n_points": 11,
    "n_embd": 32, "n_layer": 2, "n_head": 2,
    "conml_lambda": 0.1, "conml_loss": "infonce", "conml_distance": "sq_euclidean",
    "max_steps": STEPS, "learning_rate": 0.003, "warmup_steps": 0, "lr_scheduler_type": "linear",
    "logging_steps": 1, "save_steps": 2, "save_total_limit": 5,
    "eval_n_prompts": 32, "eval_strategy": "steps", "eval_steps": STEPS, "per_device_eval_batch_size": 8,
    "seed": 3, "report_to": "none", "disable_tqdm": True,
}  # fmt: skip
LOGGED = ("icl_loss", "conml_loss", "d_in", "d_out")


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check(process: subprocess.CompletedProcess | subprocess.Popen, log: str) -> None:
    assert process.returncode == 0, f"launch failed (exit {process.returncode}):\n{log[-6000:]}"


def _launch(config: str, recipe: Path, output_dir: Path, *extra: str) -> None:
    """``accelerate launch`` of the training CLI on 2 CPU processes, as a user runs it."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
        "-m", "icl_conml.train", str(recipe), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", str(GLOBAL_BATCH // 2), *extra,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    _check(done, done.stdout + done.stderr)


def _curve(output_dir: Path) -> dict[int, dict[str, float]]:
    """The logged loss components per step, and the final eval_loss (key ``"eval"``)."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    curve: dict = {entry["step"]: {k: entry[k] for k in LOGGED} for entry in history if "icl_loss" in entry}
    evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    if evals:
        curve["eval"] = evals[-1]
    return curve


def _assert_same_curve(got: dict, want: dict) -> None:
    assert sorted(got, key=str) == sorted(want, key=str), (sorted(got, key=str), sorted(want, key=str))
    if "eval" in want:  # the fixed eval set, sharded across processes: the same mean loss
        assert got["eval"] == pytest.approx(want["eval"], rel=1e-4)
    for step in (step for step in want if step != "eval"):
        for key in LOGGED:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=2e-6), (step, key)


# The paper's ICL setting (difference form, sigmoid_sq, λ = 0.02), the project's default.
PAPER_RECIPE = {
    **TINY_RECIPE, "conml_lambda": 0.02, "conml_loss": "difference", "conml_distance": "sigmoid_sq",
    "eval_strategy": "no",
}  # fmt: skip


def _write_recipe(tmp_path_factory, recipe: dict) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _one_process_run(recipe_file: Path, tmp_path_factory) -> Path:
    """The reference: one process holding the whole global batch."""
    output_dir = tmp_path_factory.mktemp("one_process")
    code = train_main(
        [
            str(recipe_file),
            "--output_dir",
            str(output_dir),
            "--per_device_train_batch_size",
            str(GLOBAL_BATCH),
        ]
    )
    assert code == 0
    return output_dir


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    return _write_recipe(tmp_path_factory, TINY_RECIPE)


@pytest.fixture(scope="module")
def one_process(recipe_file: Path, tmp_path_factory) -> Path:
    return _one_process_run(recipe_file, tmp_path_factory)


def _predictions(model: ICLModel, recipe_file: Path) -> torch.Tensor:
    prompts = build_eval_prompts(parse_recipe([str(recipe_file)]))
    with torch.no_grad():
        return model.eval()(xs=prompts.xs, ys=prompts.ys).predictions


# ---- configs -------------------------------------------------------------------------------------
def test_accelerate_configs_load_as_documented():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {
        REPO / "accelerate_config.yaml": "MULTI_GPU",
        CONFIGS / "ddp.yaml": "MULTI_GPU",
        CONFIGS / "cpu_2proc.yaml": "MULTI_GPU",  # torchrun starts both processes
        CONFIGS / "zero2.yaml": "DEEPSPEED",
        CONFIGS / "zero3.yaml": "DEEPSPEED",
        CONFIGS / "zero3_offload.yaml": "DEEPSPEED",
        CONFIGS / "fsdp.yaml": "FSDP",
    }
    for path, kind in expected.items():
        config = load_config_from_file(str(path))
        assert str(getattr(config.distributed_type, "value", config.distributed_type)) == kind, path.name
        assert config.use_cpu is False, path.name
        if kind == "DEEPSPEED":
            ds_file = REPO / config.deepspeed_config["deepspeed_config_file"]
            ds = json.loads(ds_file.read_text())
            for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
                assert ds[key] == "auto", (ds_file.name, key)  # filled from the recipe by the Trainer
            assert ds["bf16"] == {"enabled": "auto"}
            stage = ds["zero_optimization"]["stage"]
            assert stage == (2 if path.stem == "zero2" else 3)
            if stage == 3:  # save_model must write full weights
                assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        elif path.stem != "cpu_2proc":
            assert str(config.mixed_precision) == "bf16", path.name
    assert load_config_from_file(str(CONFIGS / "cpu_2proc.yaml")).num_processes == 2
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_the_recipe_picks_the_cpu(tmp_path):
    # Without use_cpu, a torchrun launch on CPU would let every process train alone.
    assert ICLTrainingArguments(output_dir=str(tmp_path)).use_cpu is True


# ---- real 2-process launches ---------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_processes_train_like_one(recipe_file, one_process, tmp_path):
    _launch("cpu_2proc.yaml", recipe_file, tmp_path / "ddp")
    _assert_same_curve(_curve(tmp_path / "ddp"), _curve(one_process))


@pytest.mark.slow
def test_ddp_two_processes_train_like_one_with_the_papers_conml(tmp_path_factory, tmp_path):
    recipe = _write_recipe(tmp_path_factory, PAPER_RECIPE)
    _launch("cpu_2proc.yaml", recipe, tmp_path / "ddp")
    _assert_same_curve(_curve(tmp_path / "ddp"), _curve(_one_process_run(recipe, tmp_path_factory)))


@pytest.mark.slow
def test_ddp_two_processes_train_like_one_with_a_task_pool_smaller_than_the_batch(tmp_path_factory, tmp_path):
    # 8 rows from 3 tasks: copies of a task sit on both processes; their task ids are gathered so
    # that no copy is a negative (InfoNCE) nor a d_out pair, and d_out is the whole batch's mean.
    recipe = _write_recipe(tmp_path_factory, {**TINY_RECIPE, "task_pool_size": 3, "eval_strategy": "no"})
    _launch("cpu_2proc.yaml", recipe, tmp_path / "ddp")
    _assert_same_curve(_curve(tmp_path / "ddp"), _curve(_one_process_run(recipe, tmp_path_factory)))


@pytest.mark.slow
def test_zero2_trains_like_one_process_and_resumes_on_its_curve(recipe_file, one_process, tmp_path):
    first = tmp_path / "zero2"
    _launch("zero2.yaml", recipe_file, first)
    curve = _curve(first)
    _assert_same_curve(curve, _curve(one_process))
    assert (first / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own sharded checkpoint

    resumed = tmp_path / "zero2_resumed"
    _launch("zero2.yaml", recipe_file, resumed, "--resume_from_checkpoint", str(first / "checkpoint-2"))
    after = {step: values for step, values in _curve(resumed).items() if step == "eval" or step > 2}
    _assert_same_curve(after, {step: curve[step] for step in (3, 4, "eval")})


@pytest.mark.slow
def test_zero3_trains_like_one_process_and_saves_full_weights(recipe_file, one_process, tmp_path):
    output_dir = tmp_path / "zero3"
    _launch("zero3.yaml", recipe_file, output_dir)
    _assert_same_curve(_curve(output_dir), _curve(one_process))

    saved = ICLModel.from_pretrained(output_dir)
    reference = ICLModel.from_pretrained(one_process)
    shapes = {name: tuple(p.shape) for name, p in saved.named_parameters()}
    assert shapes == {name: tuple(p.shape) for name, p in reference.named_parameters()}
    assert all(p.numel() > 0 for p in saved.parameters())  # gathered, not ZeRO-3's empty shards
    predictions = _predictions(saved, recipe_file)
    torch.testing.assert_close(predictions, _predictions(reference, recipe_file), rtol=1e-4, atol=1e-4)
    untrained = _predictions(build_model(parse_recipe([str(recipe_file)])), recipe_file)
    assert (predictions - untrained).abs().max() > 1e-2  # the trained weights, not the initial ones


# ---- many nodes (recipes/launch.slurm, plain bash) --------------------------------------------------
FAKE_JOB = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1"}
# scontrol, as the script uses it in an allocation: `scontrol show hostnames LIST` (this stand-in
# splits a comma-separated list; SLURM's own expands the bracket forms, e.g. gpu[07-08]).
FAKE_SCONTROL = """#!/bin/bash
[[ $1 == show && $2 == hostnames ]] && tr ',' '\\n' <<<"$3"
"""


@pytest.fixture
def fake_slurm(tmp_path) -> Path:
    """A folder whose ``bin`` holds the scontrol stand-in."""
    folder = tmp_path / "slurm"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "scontrol").write_text(FAKE_SCONTROL)
    (folder / "bin" / "scontrol").chmod(0o755)
    return folder


def _slurm_env(fake_slurm: Path, nodelist: str, **variables: str) -> dict[str, str]:
    env = {**_env(), **FAKE_JOB, "SLURM_JOB_NODELIST": nodelist, "PYTHON": sys.executable, **variables}
    env["PATH"] = f"{fake_slurm / 'bin'}{os.pathsep}{env['PATH']}"
    env.setdefault("MASTER_PORT", str(_free_port()))
    return env


def _slurm_dry_run(fake_slurm: Path, config: str, *train_args: str, nodelist: str = "localhost,localhost",
                   **variables: str) -> list[list[str]]:  # fmt: skip
    env = _slurm_env(fake_slurm, nodelist, DRY_RUN="1", **variables)
    done = subprocess.run(
        ["bash", "recipes/launch.slurm", config, *train_args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    _check(done, done.stdout + done.stderr)
    return [shlex.split(line) for line in done.stdout.splitlines()]


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_slurm_script_is_plain_bash_and_the_python_launcher_is_gone():
    assert subprocess.run(["bash", "-n", "recipes/launch.slurm"], cwd=REPO).returncode == 0
    assert importlib.util.find_spec("icl_conml.launch") is None


def test_slurm_commands_for_two_nodes_name_ranks_address_and_port(fake_slurm):
    commands = _slurm_dry_run(fake_slurm, "recipes/accelerate/zero2.yaml", "recipes/linear_regression.yaml",
                              "--bf16", "true", nodelist="gpu07,gpu08", MASTER_PORT="")  # fmt: skip
    assert len(commands) == 2
    for rank, command in enumerate(commands):
        assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
        assert _option(command, "--machine_rank") == str(rank)
        assert _option(command, "--num_machines") == "2"
        assert _option(command, "--num_processes") == "2"  # 2 nodes x 1 GPU
        assert _option(command, "--main_process_ip") == "gpu07"
        assert _option(command, "--main_process_port") == str(20000 + 4242)  # from the job id
        assert _option(command, "--deepspeed_multinode_launcher") == "standard"  # not pdsh/ssh
        assert command[-5:] == ["-m", "icl_conml.train", "recipes/linear_regression.yaml", "--bf16", "true"]


def test_slurm_gpu_count_and_a_requeued_job_resuming_its_run(fake_slurm):
    variables = {"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:8", "SLURM_RESTART_COUNT": "1"}
    [command] = _slurm_dry_run(fake_slurm, "recipes/accelerate/ddp.yaml", "my recipe.yaml", nodelist="gpu1",
                               **variables)  # fmt: skip
    assert _option(command, "--num_processes") == "8" and "--deepspeed_multinode_launcher" not in command
    assert command[-3:] == ["my recipe.yaml", "--resume_from_checkpoint", "auto"]


def test_slurm_script_outside_an_allocation_says_so(fake_slurm):
    env = {key: value for key, value in _slurm_env(fake_slurm, "").items() if key != "SLURM_JOB_NODELIST"}
    done = subprocess.run(["bash", "recipes/launch.slurm", "recipes/accelerate/ddp.yaml", "quickstart"],
                          cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("launch.slurm: error: SLURM_JOB_NODELIST is not set")


@pytest.mark.slow
def test_slurm_commands_for_two_fake_nodes_train_like_one_process(
    fake_slurm, recipe_file, one_process, tmp_path
):
    """Both 'nodes' on this machine: the generated commands rendezvous and train as one run
    (under ZeRO-2, the multi-node DeepSpeed path: every node starts its own processes)."""
    output_dir = tmp_path / "two_nodes"
    commands = _slurm_dry_run(
        fake_slurm, "recipes/accelerate/zero2.yaml", str(recipe_file), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", str(GLOBAL_BATCH // 2),
    )  # fmt: skip
    logs = [tmp_path / f"node{rank}.log" for rank in range(2)]
    nodes = [
        subprocess.Popen(command, cwd=REPO, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
        for command, log in zip(commands, logs, strict=True)
    ]
    deadline = time.monotonic() + 400
    for node, log in zip(nodes, logs, strict=True):
        try:
            node.wait(timeout=max(1, deadline - time.monotonic()))
        finally:
            if node.poll() is None:
                node.kill()
        _check(node, log.read_text())
    _assert_same_curve(_curve(output_dir), _curve(one_process))


# ---- GPU check -----------------------------------------------------------------------------------
def test_gpu_check_parses_and_dry_runs_on_cpu(tmp_path):
    """Every stage of the GPU check runs on CPU (tiny model, few steps): the launches (DDP through
    torchrun, ZeRO-2 through accelerate), the kernel probe, the learning check and the report."""
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    committed = (REPO / "docs" / "gpu.md").read_text()
    report = tmp_path / "gpu.md"
    done = subprocess.run(
        ["bash", str(script), "--dry-run", "--report", str(report)],
        cwd=REPO, env={**_env(), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    _check(done, done.stdout + done.stderr)
    text = report.read_text()
    assert text.startswith("DRY RUN on CPU")  # never mistaken for a GPU measurement
    assert "## Not measured" not in text, text  # no stage failed or ran out of time
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    launchers = {
        "fp32": "single process",
        "bf16": "single process",
        "ddp": "DDP (gloo)",
        "zero2": "DeepSpeed ZeRO-2",
    }
    for group, launcher in launchers.items():
        for kind in ("plain", "conml"):  # measured: step time, steps/s, tokens/s, memory, FLOP/s
            cells = [cell.strip() for cell in rows[f"{group} {kind}"].split("|")[2:-1]]
            assert cells[0] == launcher and cells[2] == "8", cells
            assert all(float(cells[i].replace(",", "")) > 0 for i in (4, 5, 6, 7, 8)), cells
            if kind == "conml":  # ConML's appended tokens are counted; the ratio to plain is given
                assert int(cells[3]) > int(rows[f"{group} plain"].split("|")[5]) and cells[10].endswith("x")
    assert (
        rows["zero2 conml"].split("|")[3].strip() == "bf16"
        and rows["fp32 plain"].split("|")[3].strip() == "fp32"
    )
    for inputs in ("plain (causal, no mask)", "ConML (4D additive mask)"):  # the kernel probe
        for precision in ("fp32", "bf16"):
            line = next(line for line in text.splitlines() if line.startswith(f"| {inputs} | {precision} |"))
            assert "_scaled_dot_product" in line and " ms |" in line, line  # a kernel named, one timed
    assert "## Learning check" in text and "training loss" in text  # it trained and logged losses
    assert (REPO / "docs" / "gpu.md").read_text() == committed  # a dry run never overwrites the record
