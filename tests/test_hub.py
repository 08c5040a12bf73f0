"""Model cards, pushes through the Trainer (Hub API replaced by a recording double), and loading offline."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import transformers.utils.hub
import yaml
from huggingface_hub import ModelCard, RepoUrl, scan_cache_dir
from huggingface_hub import errors as hub_errors
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoModel, GPT2Config, GPT2Model

import icl_conml  # noqa: F401  (registers the Auto classes)
from icl_conml import ICLConfig, ICLModel
from icl_conml.arguments import ModelArguments
from icl_conml.evaluation import EvaluationArguments, evaluate_model, results_table, write_results
from icl_conml.hub import HubPushError, explain_push_error, push_folder
from icl_conml.hub import main as hub_main
from icl_conml.lora import prepare_model
from icl_conml.model_card import build_model_card, write_model_card
from icl_conml.recipe_parser import parse_recipe
from icl_conml.train import main, run

# The HTTP client the installed huggingface_hub raises with: httpx2 in newer releases, httpx in
# older ones (e.g. 1.33); its exception types are the ones the project's error handling sees.
http = importlib.import_module(hub_errors.HTTPError.__module__.split(".")[0])

TINY = [
    "--n_dims", "3", "--n_points", "6", "--n_embd", "16", "--n_layer", "1", "--n_head", "2",
    "--per_device_train_batch_size", "8", "--eval_n_prompts", "0", "--logging_steps", "1",
    "--warmup_steps", "0", "--report_to", "none", "--disable_tqdm", "true",
]  # fmt: skip


class RecordingHubApi:
    """Stands in for ``huggingface_hub.HfApi`` at the network boundary and records every call.

    Each upload records the files ``upload_folder`` would send at that moment (after its
    ignore patterns) and the README text; any other Hub method fails the test.
    """

    def __init__(self, fail_uploads: int | None = None) -> None:
        self.calls: list[dict] = []
        self.fail_uploads = fail_uploads

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        self.calls.append(
            {"call": "create_repo", "repo_id": repo_id, "private": private, "exist_ok": exist_ok}
        )
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, run_as_future=False,
                      ignore_patterns=None, **kwargs):  # fmt: skip
        folder = Path(folder_path)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        files = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        readme = (folder / "README.md").read_text() if (folder / "README.md").is_file() else None
        self.calls.append(
            {"call": "upload_folder", "repo_id": repo_id, "path_in_repo": path_in_repo, "files": files,
             "message": commit_message, "readme": readme}
        )  # fmt: skip
        if self.fail_uploads is not None:
            request = http.Request("POST", f"https://huggingface.co/api/models/{repo_id}/commit/main")
            raise HfHubHTTPError("403 Forbidden", response=http.Response(403, request=request))
        result = {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"}
        if run_as_future:
            future: Future = Future()
            future.set_result(result)
            return future
        return result


@pytest.fixture
def hub_api(monkeypatch) -> RecordingHubApi:
    api = RecordingHubApi()
    monkeypatch.setattr(
        transformers.utils.hub, "_hf_api", api
    )  # what transformers.utils.hub.hf_api() returns
    return api


def final_loss(folder: Path) -> float:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry][-1]["loss"]


# ---- model cards -----------------------------------------------------------------------------------------
def test_every_saved_folder_gets_a_model_card(tmp_path):
    out = tmp_path / "run"
    run(parse_recipe([*TINY, "--max_steps", "4", "--save_steps", "2", "--output_dir", str(out)]))
    for folder in (out, out / "checkpoint-2", out / "checkpoint-4"):
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "transformers"
        assert {"icl_conml", "in-context-learning", "linear_regression", "conml"} <= set(card.data.tags)
        text = card.text
        assert "**linear_regression** (inputs of dimension d = 3, up to 6 (x, y) pairs" in text
        assert "| conml_lambda | 0.02 |" in text and "| conml_views | prefix_half |" in text
        recipe = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
        assert recipe == yaml.safe_load((out / "recipe.yaml").read_text())
        assert (folder / "recipe.yaml").is_file()
    # the training summary holds the final losses of the log history, with their units
    checkpoint_card = (out / "checkpoint-2" / "README.md").read_text()
    loss = (
        "| training loss (squared error, not normalised; with ConML: + λ · ConML term) (step {}) | {:.4g} |"
    )
    assert loss.format(2, final_loss(out / "checkpoint-2")) in checkpoint_card
    final_card = (out / "README.md").read_text()
    assert loss.format(4, final_loss(out)) in final_card and "| training time | " in final_card
    assert "learning_rate" not in final_card.split("## Recipe")[0]  # optimiser internals are left out
    assert "license: apache-2.0" in final_card and "@inproceedings{wu2025conml," in final_card
    assert "eprint    = {2208.01066}" in final_card and "## Limitations" in final_card


def test_a_card_that_cannot_be_written_never_stops_training(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{not json")
    run(parse_recipe([*TINY, "--max_steps", "2", "--save_steps", "1", "--output_dir", str(out)]))
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-2" / "README.md").is_file()
    assert not (out / "README.md").exists()
    assert "could not write the model card" in caplog.text and "JSONDecodeError" in caplog.text


def test_card_includes_an_evaluation(tmp_path):
    """A real evaluation's files: its own table and plot in the body, its numbers as model-index."""
    model_dir, eval_dir = tmp_path / "model", tmp_path / "eval"
    model = ICLModel(ICLConfig(n_dims=3, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(model_dir)
    args = EvaluationArguments(
        n_prompts=32, bootstrap_samples=20, threshold=10.0, baselines=["least_squares"]
    )
    results = evaluate_model(model, args, model_id="tiny")
    write_results(results, eval_dir)
    assert (
        "## Evaluation" not in build_model_card(model_dir).text
        and not build_model_card(model_dir).data.eval_results
    )
    write_model_card(model_dir, evaluation_dir=eval_dir)
    card = ModelCard.load(model_dir / "README.md")
    assert results_table(results).strip() in card.text  # the evaluation's own table (results.md)
    assert "![error against the number of in-context examples](curves.png)" in card.text
    assert (model_dir / "curves.png").is_file() and (model_dir / "results.json").is_file()
    # model-index: error at k = d and 2d and the needed context length of the model, machine-readable
    curve = results["curves"]["model"]
    found = {(r.metric_type, json.dumps(r.metric_args)): r for r in card.data.eval_results}
    assert set(found) == {
        ("error_at_k", '{"k": 3}'), ("error_at_k", '{"k": 6}'), ("needed_context_length", '{"threshold": 10.0}')
    }  # fmt: skip
    assert found["error_at_k", '{"k": 3}'].metric_value == pytest.approx(curve[3])
    assert found["error_at_k", '{"k": 6}'].metric_value == pytest.approx(curve[6])
    assert found["needed_context_length", '{"threshold": 10.0}'].metric_value == 0
    first = card.data.eval_results[0]
    assert (first.task_type, first.dataset_type, first.dataset_name) == (
        "in-context-learning", "linear_regression", "linear_regression, d=3"
    )  # fmt: skip
    assert first.dataset_args == {"n_dims": 3, "n_points": 8, "n_prompts": 32, "seed": 0}
    assert "model-index:" in (model_dir / "README.md").read_text()
    # without results.md the model-index values are shown; the card command rewrites the card
    (model_dir / "results.md").unlink()
    assert hub_main(["card", str(model_dir)]) == 0
    text = (model_dir / "README.md").read_text()
    assert (
        f"| error at k=3 (d) | {curve[3]:.4g} |" in text
        and "| needed context length (error ≤ 10) | 0 |" in text
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_cards_usage_snippet_runs_offline_against_the_local_folder(tmp_path, lora):
    """The card's python block, with the repo id replaced by the run's folder, runs in a fresh
    interpreter (offline) and prints the normalised error at each k."""
    out = tmp_path / "run"
    extra = []
    if lora:
        backbone = tmp_path / "gpt2"
        config = GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32, vocab_size=4)
        GPT2Model(config).save_pretrained(backbone)
        extra = ["--backbone_name_or_path", str(backbone), "--lora_r", "2"]
    run(parse_recipe([*TINY, *extra, "--max_steps", "2", "--save_steps", "100", "--output_dir", str(out)]))
    card = (out / "README.md").read_text()
    [snippet] = re.findall(r"```python\n(.*?)```", card, re.S)
    assert snippet.count('"PATH_OR_HUB_ID"') == 1 + lora  # the merge hint names it too
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace("PATH_OR_HUB_ID", str(out)))
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    errors = [float(v) for v in re.findall(r"[-+]?\d*\.\d+(?:e[-+]?\d+)?", done.stdout)]
    assert len(errors) == 6 and all(value >= 0 for value in errors)  # one error per k = 0..5


# ---- pushing -------------------------------------------------------------------------------------------------
def test_push_through_the_trainer_uploads_cards_checkpoints_and_final_model(tmp_path, hub_api):
    out = tmp_path / "run"
    recipe = parse_recipe(
        [*TINY, "--max_steps", "4", "--save_steps", "2", "--output_dir", str(out), "--push_to_hub", "true",
         "--hub_model_id", "me/icl-test", "--hub_strategy", "checkpoint", "--hub_private_repo", "true"]
    )  # fmt: skip
    run(recipe)
    calls = hub_api.calls
    assert calls[0] == {"call": "create_repo", "repo_id": "me/icl-test", "private": True, "exist_ok": True}
    uploads = [(c["path_in_repo"], c["message"]) for c in calls[1:]]
    assert uploads == [
        (None, "Training in progress, step 2"),
        ("last-checkpoint", "Training in progress, step 2, checkpoint"),
        (None, "Training in progress, step 4"),
        ("last-checkpoint", "Training in progress, step 4, checkpoint"),
        (None, "Model save"),
    ]
    model_files = {"config.json", "model.safetensors", "README.md", "recipe.yaml"}
    for call in calls[1:]:
        assert model_files <= set(call["files"]), call
        assert not any(f.startswith("checkpoint-") for f in call["files"])
        assert "library_name: transformers" in call["readme"] and "```python" in call["readme"]
        assert 'AutoModel.from_pretrained("me/icl-test")' in call["readme"]
    assert {"optimizer.pt", "trainer_state.json", "scheduler.pt"} <= set(calls[2]["files"])
    loss_row = "| training loss (squared error, not normalised; with ConML: + λ · ConML term)"
    assert f"{loss_row} (step 2) |" in calls[1]["readme"]  # the repo's card follows the checkpoint
    assert f"{loss_row} (step 4) | {final_loss(out):.4g} |" in calls[-1]["readme"]
    assert "| training time |" in calls[-1]["readme"]


def test_lora_push_uploads_adapter_and_config(tmp_path, hub_api):
    backbone = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32, vocab_size=4)).save_pretrained(
        backbone
    )
    out = tmp_path / "run"
    run(
        parse_recipe(
            [*TINY, "--backbone_name_or_path", str(backbone), "--lora_r", "2", "--max_steps", "2",
             "--save_steps", "2", "--output_dir", str(out), "--push_to_hub", "true", "--hub_model_id", "me/lora"]
        )
    )  # fmt: skip
    final = hub_api.calls[-1]
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "README.md"} <= set(
        final["files"]
    )
    assert "model.safetensors" not in final["files"]
    assert "library_name: peft" in final["readme"] and 'load_lora_model("me/lora")' in final["readme"]
    # The repo names itself as the adapter's base: AutoModel.from_pretrained("me/lora") loads the run
    # (tests/test_lora.py loads such a repo by id from an HF cache).
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/lora"


def test_push_fails_fast_offline_before_training(tmp_path, capsys):
    """HF_HUB_OFFLINE=1 (set for every test): the repo cannot be created, so nothing trains."""
    out = tmp_path / "run"
    args = [
        *TINY,
        "--max_steps",
        "2",
        "--output_dir",
        str(out),
        "--push_to_hub",
        "true",
        "--hub_model_id",
        "me/x",
    ]
    with pytest.raises(HubPushError, match=r"cannot create the Hub repo me/x: offline mode is on"):
        run(parse_recipe(args))
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert (
        "push_to_hub: false" in error and f"python -m icl_conml.hub push {out} --hub_model_id me/x" in error
    )
    assert not any(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


def test_failed_final_push_keeps_the_local_run(tmp_path, monkeypatch):
    api = RecordingHubApi(fail_uploads=403)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", api)
    out = tmp_path / "run"
    recipe = parse_recipe(
        [*TINY, "--max_steps", "2", "--save_steps", "2", "--output_dir", str(out), "--push_to_hub", "true",
         "--hub_model_id", "someone-else/x", "--hub_strategy", "end"]
    )  # fmt: skip
    with pytest.raises(HubPushError) as raised:
        run(recipe)
    message = str(raised.value)
    assert message.startswith(f"training finished and {out} holds the model and checkpoints")
    assert (
        "the token may not write to someone-else/x" in message and "python -m icl_conml.hub push" in message
    )
    for name in ("model.safetensors", "config.json", "README.md", "trainer_state.json", "checkpoint-2"):
        assert (out / name).exists(), name
    assert [c["call"] for c in api.calls] == ["create_repo", "upload_folder"]  # hub_strategy end: one push


def test_push_folder_refreshes_the_card_and_skips_checkpoints(tmp_path, hub_api):
    folder = tmp_path / "run"
    ICLModel(ICLConfig(n_dims=3, n_positions=4, n_embd=16, n_layer=1, n_head=2)).save_pretrained(folder)
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1" / "optimizer.pt").write_bytes(b"0")
    push_folder(folder, "me/later", private=True)
    create, upload = hub_api.calls
    assert create["repo_id"] == "me/later" and create["private"] is True
    assert upload["files"] == ["README.md", "config.json", "model.safetensors"]
    assert 'from_pretrained("me/later")' in upload["readme"]


# ---- loading ------------------------------------------------------------------------------------------------
def tiny_model() -> ICLModel:
    torch.manual_seed(0)
    return ICLModel(ICLConfig(n_dims=3, n_positions=4, n_embd=16, n_layer=1, n_head=2)).eval()


def test_round_trip_from_a_local_folder_safetensors_only(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())  # no remote code
    xs, ys = torch.randn(2, 4, 3), torch.randn(2, 4)
    expected = model(xs=xs, ys=ys).predictions
    for loaded in (ICLModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is ICLModel
        torch.testing.assert_close(loaded.eval()(xs=xs, ys=ys).predictions, expected, atol=1e-6, rtol=0)


LOAD_FROM_CACHE = """
import sys, torch
import icl_conml
from icl_conml.lora import load_lora_model, merge
from transformers import AutoModel
xs, ys = torch.load(sys.argv[1])
models = [
    AutoModel.from_pretrained("me/icl-cached"),
    icl_conml.ICLModel.from_pretrained("me/icl-cached"),
    load_lora_model("me/lora-cached"),
    merge("me/lora-cached"),  # a plain ICLModel: the adapters merged onto the backbone
]
torch.save([m.eval()(xs=xs, ys=ys).predictions for m in models], sys.argv[2])
"""


def cache_snapshot(hub_cache: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in huggingface_hub's cache layout (refs/main → commit)."""
    repo = hub_cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_load_hub_ids_from_the_hf_cache_offline(tmp_path):
    """Snapshots laid out as huggingface_hub's cache stores them load by Hub id with no network."""
    hub_cache = tmp_path / "hf_home" / "hub"
    model = tiny_model()
    model.save_pretrained(cache_snapshot(hub_cache, "me/icl-cached"))
    backbone = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32, vocab_size=4)).save_pretrained(
        backbone
    )
    lora = prepare_model(
        ICLModel.from_pretrained_backbone(str(backbone), n_dims=3, n_positions=4), ModelArguments(lora_r=2)
    )
    with torch.no_grad():  # non-zero adapters, so that loading them matters
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_()
    snapshot = cache_snapshot(hub_cache, "me/lora-cached")
    lora.save_pretrained(snapshot)
    lora.get_base_model().config.save_pretrained(snapshot)
    cached = {r.repo_id: r for r in scan_cache_dir(hub_cache).repos}
    assert {f.file_name for f in cached["me/icl-cached"].refs["main"].files} == {
        "config.json",
        "model.safetensors",
    }
    assert {"adapter_config.json", "config.json"} <= {
        f.file_name for f in cached["me/lora-cached"].refs["main"].files
    }

    xs, ys = torch.randn(2, 4, 3), torch.randn(2, 4)
    torch.save([xs, ys], tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_FROM_CACHE, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    full, same, adapter, merged = torch.load(tmp_path / "out.pt")
    expected = model(xs=xs, ys=ys).predictions
    torch.testing.assert_close(full, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(same, expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        expected_lora = lora.eval()(xs=xs, ys=ys).predictions
        with lora.disable_adapter():
            without_adapters = lora(xs=xs, ys=ys).predictions
    torch.testing.assert_close(adapter, expected_lora, atol=1e-6, rtol=0)
    assert not torch.allclose(adapter, without_adapters)
    torch.testing.assert_close(merged, expected_lora, atol=1e-5, rtol=0)


def test_push_errors_say_why_and_what_to_do():
    request = http.Request("POST", "https://huggingface.co/api/repos/create")
    unauthorized = HfHubHTTPError("401", response=http.Response(401, request=request))
    message = explain_push_error(unauthorized, "me/x", "outputs/x", trained=False)
    assert "not logged in" in message and "hf auth login" in message and "push_to_hub: false" in message
    unreachable = http.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)
    message = explain_push_error(unreachable, "me/x", "outputs/x", trained=True)
    assert "the Hub is unreachable (ConnectError: [Errno -3] Temporary failure in name resolution)" in message
    assert message.startswith("training finished and outputs/x holds the model")


def test_hub_push_cli_offline_is_one_line(tmp_path, capsys):
    folder = tmp_path / "run"
    ICLModel(ICLConfig(n_dims=3, n_positions=4, n_embd=16, n_layer=1, n_head=2)).save_pretrained(folder)
    capsys.readouterr()
    assert hub_main(["push", str(folder), "--hub_model_id", "me/x"]) == 2  # HF_HUB_OFFLINE=1 in tests
    assert capsys.readouterr().err.strip().splitlines() == [
        f"icl_conml: error: pushing {folder} to me/x failed: offline mode is on (HF_HUB_OFFLINE=1); "
        "unset HF_HUB_OFFLINE on a machine with network"
    ]
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
