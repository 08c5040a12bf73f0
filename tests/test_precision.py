"""Training precision: under DeepSpeed bf16 the regression targets and probes stay float32.

The Trainer casts every float input to DeepSpeed's dtype before ``compute_loss``; ConMLTrainer
keeps ``ys`` and ``probes`` in float32 (``ConMLTrainer._prepare_inputs``). Checked on a real
DeepSpeed launch (ZeRO-2, bf16, one CPU process with gloo) by recording what ``compute_loss``
receives, in training and in evaluation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Trains a tiny recipe (argv[2:]) and writes the dtypes compute_loss saw to argv[1].
RECORDING_SCRIPT = """
import json, sys
import torch
from icl_conml.recipe_parser import parse_recipe
from icl_conml.train import build_trainer
from icl_conml.trainer import ConMLTrainer


class Recording(ConMLTrainer):
    seen = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        mode = "train" if model.training else "eval"
        self.seen.append({"mode": mode, **{k: str(v.dtype).removeprefix("torch.") for k, v in inputs.items()}})
        return super().compute_loss(model, inputs, *args, **kwargs)


recipe = parse_recipe(sys.argv[2:])
trainer = build_trainer(recipe, trainer_class=Recording)
trainer.train()
if trainer.is_world_process_zero():
    weights = str(next(trainer.model_wrapped.parameters()).dtype).removeprefix("torch.")
    result = {"seen": Recording.seen, "weights": weights, "deepspeed": trainer.is_deepspeed_enabled}
    with open(sys.argv[1], "w") as file:
        json.dump(result, file)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_deepspeed_bf16_keeps_targets_and_probes_float32(tmp_path):
    script, result = tmp_path / "record.py", tmp_path / "dtypes.json"
    script.write_text(RECORDING_SCRIPT)
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "recipes" / "accelerate" / "zero2.yaml"),
        "--num_processes", "1", "--main_process_port", str(_free_port()),
        str(script), str(result),
        "--n_dims", "3", "--n_points", "6", "--n_embd", "16", "--n_layer", "1", "--n_head", "2",
        "--per_device_train_batch_size", "4", "--max_steps", "2", "--conml_lambda", "0.02",
        "--bf16", "true", "--use_cpu", "true",  # use_cpu: transformers refuses bf16 on CPU without it
        "--eval_n_prompts", "4", "--per_device_eval_batch_size", "4", "--eval_strategy", "steps",
        "--eval_steps", "2", "--save_strategy", "no", "--output_dir", str(tmp_path / "run"),
        "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    recorded = json.loads(result.read_text())
    assert recorded["deepspeed"] and recorded["weights"] == "bfloat16"  # really a DeepSpeed bf16 engine
    modes = [seen["mode"] for seen in recorded["seen"]]
    assert modes.count("train") == 2 and "eval" in modes, modes
    for seen in recorded["seen"]:
        assert seen["ys"] == "float32", seen
        assert seen["xs"] == "bfloat16", seen  # xs follows the model (the read-in casts it anyway)
        if seen["mode"] == "train":
            assert seen["probes"] == "float32" and seen["view_index"] == "int64", seen
