"""LoRA on pretrained backbones (peft), with tiny GPT-2 and Llama backbones the tests save themselves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, GPT2Config, GPT2Model

import icl_conml  # noqa: F401  (registers the Auto classes)
from icl_conml import ICLModel
from icl_conml.arguments import RecipeError
from icl_conml.lora import is_lora_checkpoint, load_lora_model, merge
from icl_conml.lora import main as lora_main
from icl_conml.modeling import LoRARunError
from icl_conml.recipe_parser import parse_recipe
from icl_conml.train import build_model, build_trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=8, bos_token_id=None, eos_token_id=None
    )
    GPT2Model(config).save_pretrained(path)
    return path


def lora_recipe(backbone: Path, output_dir: Path, *extra: str):
    return parse_recipe(
        [
            "--backbone_name_or_path", str(backbone), "--lora_r", "4", "--n_dims", "3", "--n_points", "8",
            "--per_device_train_batch_size", "16", "--eval_n_prompts", "0", "--logging_steps", "1",
            "--output_dir", str(output_dir), "--report_to", "none", "--disable_tqdm", "true", *extra,
        ]
    )  # fmt: skip


def prompts(n_dims: int = 3, n_points: int = 8, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, n_points, n_dims, generator=generator), torch.randn(
        batch, n_points, generator=generator
    )


def probe_inputs(n_points: int = 8, n_dims: int = 3, batch: int = 4) -> dict[str, torch.Tensor]:
    """One probe after the first half of the context, at the position it would have there."""
    half, context = n_points // 2, 2 * n_points
    visible = torch.zeros(1, context + 1, dtype=torch.bool)
    visible[0, : 2 * half] = True
    visible[0, context] = True
    probe = torch.randn(1, 1, n_dims, generator=torch.Generator().manual_seed(2)).expand(batch, 1, n_dims)
    return {
        "appended_tokens": probe,
        "appended_position_ids": torch.tensor([2 * half]),
        "appended_visible": visible,
    }


@torch.no_grad()
def outputs(model, xs, ys) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    plain = model(xs=xs, ys=ys).predictions
    probed = model(xs=xs, ys=ys, **probe_inputs(xs.shape[1], xs.shape[2], xs.shape[0])).appended_outputs
    return plain, probed


# ---- building ----------------------------------------------------------------------------------------
def test_gpt2_lora_trains_adapters_and_read_in_out_only(gpt2_path, tmp_path):
    model = build_model(lora_recipe(gpt2_path, tmp_path))
    assert isinstance(model, PeftModel)
    config = model.peft_config["default"]
    assert set(config.target_modules) == {"c_attn"} and config.fan_in_fan_out  # GPT-2 Conv1D
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any("read_in.modules_to_save" in n for n in trainable)
    assert any("read_out.modules_to_save" in n for n in trainable)
    # Trainable count: r·(in + out) per adapted c_attn, plus read-in and read-out in full.
    base = model.get_base_model()
    expected = sum(4 * (32 + 96) for name, _ in base.backbone.named_modules() if name.endswith("c_attn"))
    expected += 3 * 32 + 32 + 32 + 1
    n_trainable, n_total = model.get_nb_trainable_parameters()
    assert n_trainable == expected == 1185
    assert n_trainable / n_total < 0.05


def test_llama_default_targets_are_peft_defaults(llama_path, tmp_path):
    model = build_model(lora_recipe(llama_path, tmp_path))
    config = model.peft_config["default"]
    assert set(config.target_modules) == {"q_proj", "v_proj"} and not config.fan_in_fan_out


def test_freeze_backbone_without_lora_trains_read_in_out_only(gpt2_path, tmp_path):
    recipe = lora_recipe(gpt2_path, tmp_path, "--lora_r", "0", "--freeze_backbone", "true")
    model = build_model(recipe)
    assert isinstance(model, ICLModel)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"read_in", "read_out"}
    # the pretrained weights were loaded, not re-initialised
    saved = load_file(gpt2_path / "model.safetensors")
    assert torch.equal(model.backbone.h[0].attn.c_attn.weight, saved["h.0.attn.c_attn.weight"])


def test_unknown_target_module_is_named_with_the_available_ones(gpt2_path, tmp_path):
    recipe = lora_recipe(gpt2_path, tmp_path, "--lora_target_modules", "c_attn", "q_proj")
    with pytest.raises(
        RecipeError, match=r"'q_proj' is not a module of the GPT2Model backbone; available: .*c_attn"
    ):
        build_model(recipe)


def test_bad_lora_keys_are_one_line_recipe_errors(gpt2_path, tmp_path):
    with pytest.raises(RecipeError, match="lora_target_modules.*lora_r=0"):
        parse_recipe(["--lora_target_modules", "c_attn"])
    with pytest.raises(RecipeError, match="lora_r=-1"):
        parse_recipe(["--lora_r", "-1"])
    with pytest.raises(RecipeError, match="lora_r=4 needs a pretrained backbone_name_or_path"):
        build_model(parse_recipe(["--lora_r", "4"]))
    with pytest.raises(RecipeError, match="backbone_name_or_path=.*could not be loaded"):
        build_model(lora_recipe(tmp_path / "missing", tmp_path))
    with pytest.raises(
        RecipeError, match="n_positions=70 pairs need 141 token positions but the backbone has 128"
    ):
        build_model(lora_recipe(gpt2_path, tmp_path, "--n_points", "70"))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("backbone", ["gpt2_path", "llama_path"])
def test_probe_masks_work_on_pretrained_backbones(backbone, attn, request):
    """A ConML probe after the first half equals running [first half, probe] as its own prompt."""
    torch.manual_seed(0)
    model = ICLModel.from_pretrained_backbone(
        str(request.getfixturevalue(backbone)), attn_implementation=attn, n_dims=3, n_positions=8
    )
    xs, ys = prompts()
    probe = probe_inputs()
    with torch.no_grad():
        model.eval()
        full = model(xs=xs, ys=ys, **probe)
        alone = model(
            xs=torch.cat([xs[:, :4], probe["appended_tokens"]], dim=1),
            ys=torch.cat([ys[:, :4], torch.zeros(4, 1)], dim=1),
        )
        plain = model(xs=xs, ys=ys)
    torch.testing.assert_close(full.appended_outputs[:, 0], alone.predictions[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(full.predictions, plain.predictions, atol=1e-6, rtol=0)


# ---- training, saving, loading, merging ----------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_gpt2(gpt2_path, tmp_path_factory):
    """12 ConML + LoRA steps on one fixed linear function (task pool of 1): fast to learn."""
    out = tmp_path_factory.mktemp("lora_run")
    recipe = lora_recipe(
        gpt2_path, out, "--conml_lambda", "0.02", "--task_pool_size", "1", "--max_steps", "12",
        "--learning_rate", "0.01", "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--save_steps", "100",
    )  # fmt: skip
    torch.set_num_threads(1)
    model = build_model(recipe)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = build_trainer(recipe, model=model)
    trainer.train()
    trainer.save_model(str(out / "final"))
    return model, before, trainer.state.log_history, out / "final"


def test_conml_lora_run_lowers_the_loss(trained_gpt2):
    _, _, history, _ = trained_gpt2
    logs = [entry for entry in history if "loss" in entry]
    assert len(logs) == 12 and all("conml_loss" in entry and "d_out" in entry for entry in logs)
    first, last = sum(e["loss"] for e in logs[:3]) / 3, sum(e["loss"] for e in logs[-3:]) / 3
    assert last < 0.5 * first


def test_only_adapters_and_read_in_out_change(trained_gpt2):
    model, before, _, _ = trained_gpt2
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    backbone_changed = {name for name in changed if ".backbone." in name}
    assert backbone_changed and all("lora_" in name for name in backbone_changed)
    assert any("lora_B" in name for name in backbone_changed)
    assert {name for name in changed if ".backbone." not in name} == {
        f"base_model.model.{m}.modules_to_save.default.{w}"
        for m in ("read_in", "read_out")
        for w in ("weight", "bias")
    }


def test_saved_folder_holds_adapter_read_in_out_and_config(trained_gpt2):
    _, _, _, folder = trained_gpt2
    files = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "README.md"} <= files
    assert "model.safetensors" not in files
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert any("read_in" in k for k in keys) and any("read_out" in k for k in keys)
    assert all("lora_" in k or "read_in" in k or "read_out" in k for k in keys)
    assert is_lora_checkpoint(folder)


def test_load_and_merge_round_trip_gives_identical_predictions(trained_gpt2, tmp_path):
    model, _, _, folder = trained_gpt2
    xs, ys = prompts()
    expected_plain, expected_probe = outputs(model, xs, ys)

    loaded = load_lora_model(folder)
    plain, probe = outputs(loaded, xs, ys)
    # Same weights; reloaded tensors may take another SIMD path, so allow float rounding.
    torch.testing.assert_close(plain, expected_plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(probe, expected_probe, atol=1e-6, rtol=0)  # masked sdpa: float rounding

    merged = merge(folder, tmp_path / "merged")
    assert type(merged) is ICLModel
    # ICLModel / AutoModel.from_pretrained load full models only: a LoRA run is refused in one
    # line naming the calls that load it (from_pretrained does not change meaning by folder)
    for load in (ICLModel.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(LoRARunError) as refused:
            load(folder)
        message = str(refused.value)
        assert message.startswith(f"{folder} is a LoRA run (adapter_config.json), not a full ICLModel")
        assert f"icl_conml.lora.load_lora_model('{folder}')" in message and "\n" not in message
        assert f"icl_conml.lora.merge('{folder}')" in message
    for candidate in (
        merged,
        ICLModel.from_pretrained(tmp_path / "merged"),
        AutoModel.from_pretrained(tmp_path / "merged"),
    ):
        plain, probe = outputs(candidate, xs, ys)
        torch.testing.assert_close(plain, expected_plain, atol=1e-5, rtol=0)
        torch.testing.assert_close(probe, expected_probe, atol=1e-5, rtol=0)
    assert (tmp_path / "merged" / "README.md").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_merge_cli(trained_gpt2, tmp_path, capsys):
    model, _, _, folder = trained_gpt2
    done = subprocess.run(
        [sys.executable, "-m", "icl_conml.lora", "merge", str(folder), str(tmp_path / "cli")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    xs, ys = prompts()
    torch.testing.assert_close(
        outputs(ICLModel.from_pretrained(tmp_path / "cli"), xs, ys)[0],
        outputs(model, xs, ys)[0],
        atol=1e-5,
        rtol=0,
    )
    assert lora_main(["merge", str(tmp_path / "cli"), str(tmp_path / "x")]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err


def test_llama_conml_lora_save_load_round_trip(llama_path, tmp_path):
    recipe = lora_recipe(
        llama_path, tmp_path, "--conml_lambda", "0.02", "--max_steps", "3", "--save_steps", "100",
        "--learning_rate", "0.01", "--warmup_steps", "0",
    )  # fmt: skip
    model = build_model(recipe)
    trainer = build_trainer(recipe, model=model)
    trainer.train()
    assert all("conml_loss" in e for e in trainer.state.log_history if "loss" in e)
    trainer.save_model(str(tmp_path / "final"))
    xs, ys = prompts()
    expected = outputs(model, xs, ys)
    loaded = outputs(load_lora_model(tmp_path / "final"), xs, ys)
    torch.testing.assert_close(loaded[0], expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded[1], expected[1], atol=1e-6, rtol=0)
    merged = outputs(merge(tmp_path / "final"), xs, ys)
    torch.testing.assert_close(merged[0], expected[0], atol=1e-5, rtol=0)


def test_lora_gpt2_recipe_runs_on_a_local_gpt2(gpt2_path, tmp_path):
    """The shipped recipe, with the Hub's gpt2 swapped for the local tiny one (no network here)."""
    from icl_conml.train import run

    recipe = parse_recipe(
        [
            str(ROOT / "recipes" / "lora_gpt2.yaml"), "--backbone_name_or_path", str(gpt2_path),
            "--max_steps", "2", "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path),
            "--eval_n_prompts", "0", "--eval_strategy", "no", "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    assert recipe.model.lora_r > 0 and recipe.conml.enabled
    run(recipe)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "README.md").is_file()


def test_resuming_a_lora_run_matches_the_uninterrupted_one(gpt2_path, tmp_path):
    from icl_conml.train import run

    args = ["--max_steps", "4", "--save_steps", "2", "--learning_rate", "0.01", "--warmup_steps", "0"]
    run(lora_recipe(gpt2_path, tmp_path / "full", *args))
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run(
        lora_recipe(
            gpt2_path, tmp_path / "resumed", *args,
            "--resume_from_checkpoint", str(tmp_path / "resumed" / "checkpoint-2"),
        )
    )  # fmt: skip
    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_a_moved_backbone_is_named_and_can_be_pointed_at(trained_gpt2, gpt2_path, tmp_path):
    model, _, _, folder = trained_gpt2
    moved = tmp_path / "run"
    shutil.copytree(folder, moved)
    config = json.loads((moved / "config.json").read_text())
    config["backbone_name_or_path"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        OSError,
        match=r"needs its pretrained backbone '.*gone'.*set backbone_name_or_path in the run's config\.json .*"
        r"pass load_lora_model\(\.\.\., backbone_name_or_path=\.\.\.\)",
    ):
        load_lora_model(moved)
    xs, ys = prompts()
    loaded = load_lora_model(moved, backbone_name_or_path=str(gpt2_path))
    torch.testing.assert_close(outputs(loaded, xs, ys)[0], outputs(model, xs, ys)[0], atol=1e-6, rtol=0)


# ---- loading by Hub id ---------------------------------------------------------------------------------
LOAD_BY_HUB_ID = """
import sys, torch
import icl_conml
from transformers import AutoModel
from icl_conml.evaluation import load_model
from icl_conml.lora import load_lora_model, merge
from icl_conml.lora import main as lora_main
from icl_conml.modeling import LoRARunError
run = "test-org/icl-lora"
for load in (AutoModel.from_pretrained, icl_conml.ICLModel.from_pretrained):  # full models only
    try:
        load(run)
        raise AssertionError(f"{load} loaded the LoRA run")
    except LoRARunError as error:
        assert "icl_conml.lora.load_lora_model('test-org/icl-lora')" in str(error), error
assert lora_main(["merge", run, sys.argv[2] + "_cli"]) == 0
models = {
    "load_lora_model": load_lora_model(run),
    "merge": merge(run, sys.argv[2] + "_merged"),
    "merge CLI": icl_conml.ICLModel.from_pretrained(sys.argv[2] + "_cli"),
    "evaluation": load_model(run),
}
probe = torch.load(sys.argv[1])
with torch.no_grad():
    torch.save({name: (type(m).__name__, m.eval()(**probe).predictions, m(**probe).appended_outputs)
                for name, m in models.items()}, sys.argv[2])
"""


def _publish(hub_cache: Path, repo_id: str, folder: Path) -> Path:
    """Copy ``folder`` into huggingface_hub's cache layout as ``repo_id`` at one commit (refs/main)."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_a_lora_run_loads_by_hub_id_offline_on_every_documented_path(trained_gpt2, gpt2_path, tmp_path):
    """The run and its backbone as Hub ids in an HF cache (as after a download), loaded offline."""
    from icl_conml.lora import record_repo_id

    model, _, _, folder = trained_gpt2
    hub_cache = tmp_path / "hub"
    _publish(hub_cache, "test-org/tiny-gpt2", gpt2_path)
    snapshot = _publish(hub_cache, "test-org/icl-lora", folder)
    config = json.loads((snapshot / "config.json").read_text())
    config["backbone_name_or_path"] = "test-org/tiny-gpt2"  # a run trained on a Hub backbone
    (snapshot / "config.json").write_text(json.dumps(config))
    assert record_repo_id(snapshot, "test-org/icl-lora")  # what a push does (icl_conml.hub)
    assert not record_repo_id(gpt2_path, "test-org/tiny-gpt2")  # not an adapter: left alone

    xs, ys = prompts()
    probe = {"xs": xs, "ys": ys, **probe_inputs()}
    torch.save(probe, tmp_path / "probe.pt")
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_BY_HUB_ID, str(tmp_path / "probe.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    expected_plain, expected_probe = outputs(model, xs, ys)
    loaded = torch.load(tmp_path / "out.pt")
    assert {name: kind for name, (kind, _, _) in loaded.items()} == {
        "load_lora_model": "PeftModel", "merge": "ICLModel", "merge CLI": "ICLModel", "evaluation": "ICLModel",
    }  # fmt: skip
    for name, (_, plain, probed) in loaded.items():
        torch.testing.assert_close(plain, expected_plain, atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(probed, expected_probe, atol=1e-5, rtol=0, msg=name)


# ---- what a LoRA run records and says ---------------------------------------------------------------------
def test_a_relative_backbone_is_recorded_absolute_and_the_run_loads_from_anywhere(
    gpt2_path, tmp_path, monkeypatch, caplog
):
    import logging

    from icl_conml.evaluation import load_model
    from icl_conml.train import main

    monkeypatch.chdir(gpt2_path.parent)
    out = tmp_path / "run"
    args = [
        "--backbone_name_or_path", gpt2_path.name, "--lora_r", "4", "--n_dims", "3", "--n_points", "8",
        "--per_device_train_batch_size", "8", "--eval_n_prompts", "0", "--max_steps", "2",
        "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="icl_conml"):
        assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["backbone_name_or_path"] == str(gpt2_path.resolve())
    assert f"backbone_name_or_path: {gpt2_path.resolve()}" in (out / "recipe.yaml").read_text()
    # The header states the trainable share: LoRA adapters plus read-in/read-out.
    model = build_model(lora_recipe(gpt2_path, tmp_path / "unused"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    [header] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resolved recipe")]
    assert f"{total:,} parameters, {trainable:,} trainable" in header
    monkeypatch.chdir(tmp_path)
    assert load_model(str(out)).config.n_dims == 3  # the backbone is found from another directory


def test_a_path_like_backbone_that_is_no_folder_is_one_line(tmp_path, monkeypatch, capsys):
    from icl_conml.train import main

    monkeypatch.chdir(tmp_path)
    code = main(
        ["--backbone_name_or_path", "./models/gpt2", "--lora_r", "4", "--output_dir", str(tmp_path / "o")]
    )
    assert code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"icl_conml: error: backbone_name_or_path='./models/gpt2' looks like a path but {tmp_path}/models/gpt2 "
        f"does not exist; pass the folder of a saved pretrained model (relative to {tmp_path} or absolute), "
        f"or a Hub id such as gpt2"
    )
    assert not (tmp_path / "o").exists()


def test_a_missing_backbone_names_the_key_to_fix_without_cutting_the_message(trained_gpt2, tmp_path):
    from icl_conml.evaluation import EvaluationError, load_model

    _, _, _, folder = trained_gpt2
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    config = json.loads((moved / "config.json").read_text())
    config["backbone_name_or_path"] = "models/gone"
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvaluationError) as raised:
        load_model(str(moved))
    message = str(raised.value)
    assert "needs its pretrained backbone 'models/gone' (a relative path" in message
    assert message.endswith(
        "set backbone_name_or_path in the run's config.json to that model's folder (absolute path) or Hub id, "
        "or pass load_lora_model(..., backbone_name_or_path=...) in Python"
    )


def test_wrapping_in_peft_raises_no_deprecation_warning(gpt2_path, tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_model(lora_recipe(gpt2_path, tmp_path))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
