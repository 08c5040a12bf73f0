"""Every recipe key reaches the trackers: a real tiny run with report_to=tensorboard, read back
from its event file with TensorBoard's own reader."""

import json
import logging
from pathlib import Path

import pytest
from conftest import TINY_TRAIN_ARGS

from icl_conml import __version__
from icl_conml.arguments import ConMLArguments, ModelArguments, TaskArguments
from icl_conml.recipe_parser import parse_recipe
from icl_conml.tracking import git_commit
from icl_conml.train import main


def _event_files(out: Path) -> list[Path]:
    return sorted(out.glob("runs/**/events.out.tfevents.*"))


def _read(event_file: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(event_file), size_guidance={"tensors": 0})
    accumulator.Reload()
    return accumulator


def _hparams(accumulator) -> dict:
    from tensorboard.plugins.hparams import metadata

    content = accumulator.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    return {key: getattr(value, value.WhichOneof("kind")) for key, value in start.hparams.items()}


def test_every_recipe_key_reaches_tensorboard(tmp_path, caplog):
    out = tmp_path / "run"
    overrides = ["--conml_lambda", "0.125", "--conml_num_views", "2", "--conml_views", "random_subset"]
    args = [
        *TINY_TRAIN_ARGS,
        "--max_steps",
        "2",
        "--output_dir",
        str(out),
        *overrides,
        "--report_to",
        "tensorboard",
    ]
    with caplog.at_level(logging.INFO, logger="icl_conml"):
        assert main(args) == 0
    recipe_keys = {
        name
        for section in (ModelArguments, TaskArguments, ConMLArguments)
        for name in section.__dataclass_fields__
    }
    expected = parse_recipe(args).to_dict()

    (event_file,) = _event_files(out)
    accumulator = _read(event_file)
    # The Trainer's TensorBoardCallback writes TrainingArguments.to_dict() as the "args" text.
    text = accumulator.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    recorded = json.loads(text)
    assert recipe_keys <= set(recorded), recipe_keys - set(recorded)
    assert set(expected) <= set(recorded), set(expected) - set(recorded)
    for key in recipe_keys:
        assert recorded[key] == expected[key], key
    assert recorded["conml_lambda"] == 0.125 and recorded["conml_views"] == "random_subset"
    assert recorded["icl_conml_version"] == __version__
    assert recorded.get("icl_conml_git_commit") == git_commit().get("icl_conml_git_commit")
    # ... and the HParams dashboard gets the same keys.
    hparams = _hparams(accumulator)
    assert (recipe_keys | set(expected)) <= set(hparams)
    assert hparams["conml_lambda"] == 0.125 and hparams["conml_num_views"] == 2
    assert hparams["learning_rate"] == pytest.approx(0.001)
    assert "train/loss" in accumulator.Tags()["scalars"]

    # A short header is logged once at start; every key is in recipe.yaml.
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resolved recipe")]
    assert len(logged) == 1 and "ConML λ = 0.125" in logged[0] and "× 32 wide" in logged[0]
    assert f"every key in {out / 'recipe.yaml'}" in logged[0]
    # recipe.yaml stays a recipe: no tracker-only keys (it must load back as a recipe).
    assert "icl_conml_version" not in (out / "recipe.yaml").read_text()
