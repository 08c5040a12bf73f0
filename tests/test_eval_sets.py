"""Eval sets: hyper-parameter defaults from the task classes, a dataset card, loading from a
folder and from a Hub id offline (the HF cache in the hub cache layout)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import DatasetCard

from icl_conml import eval_sets, tasks
from icl_conml import evaluation as ev

D, N, SEED = 5, 12, 4  # the conftest tiny model: n_dims 5, n_positions 12


def test_every_task_builds_with_the_class_defaults():
    for name in tasks.TASKS:
        dataset = eval_sets.build_eval_set(name, D, N, 8, SEED)
        recorded = json.loads(dataset[0]["task_kwargs"])
        defaults = eval_sets.task_hyperparameters(tasks.get_task(name, D))
        assert recorded == defaults, name
        # The prompts are those the evaluation CLI draws for the seed.
        prompts = ev.sample_prompts(tasks.get_task(name, D, **defaults), 8, N, SEED)
        assert torch.equal(torch.tensor(dataset["xs"]), prompts.xs), name
        assert torch.equal(torch.tensor(dataset["ys"]), prompts.ys), name


@dataclasses.dataclass
class ScaledLinear(tasks.LinearRegression):
    """A new function class with a hyper-parameter no recipe key knows."""

    scale: float = 2.0

    def __post_init__(self) -> None:
        self.name = "scaled_linear"

    def evaluate(self, params, xs, generator=None):
        return self.scale * super().evaluate(params, xs)


def test_a_new_task_hyperparameter_needs_no_change(monkeypatch, tmp_path, request):
    """The old script raised KeyError for any hyper-parameter missing from its copy of the defaults."""
    tasks.TASKS.add("scaled_linear", ScaledLinear)
    request.addfinalizer(lambda: tasks.TASKS.remove("scaled_linear"))
    if hasattr(tasks, "TASK_KWARGS"):  # before hyper-parameters were read from the class's fields
        monkeypatch.setitem(tasks.TASK_KWARGS, "scaled_linear", ("scale",))
    dataset = eval_sets.build_eval_set("scaled_linear", D, N, 4, SEED)
    assert json.loads(dataset[0]["task_kwargs"]) == {"scale": 2.0}
    common = ["--tasks", "scaled_linear", "--n_dims", str(D), "--n_points", str(N), "--n_prompts", "4"]
    assert eval_sets.main([*common, "--scale", "3", "--output_dir", str(tmp_path)]) == 0
    saved = eval_sets.load(str(tmp_path / f"scaled_linear_d{D}_n{N}_s0"))
    assert json.loads(saved[0]["task_kwargs"]) == {"scale": 3.0}
    assert (
        eval_sets.main([*common, "--task_kwargs", '{"scale": 0.5}', "--output_dir", str(tmp_path / "b")]) == 0
    )


def _make(tmp_path: Path, *extra: str) -> Path:
    argv = ["--tasks", "linear_regression", "--n_dims", str(D), "--n_points", str(N), "--n_prompts", "32"]
    assert eval_sets.main([*argv, "--seed", str(SEED), "--output_dir", str(tmp_path), *extra]) == 0
    return tmp_path / f"linear_regression_d{D}_n{N}_s{SEED}"


def test_dataset_card_says_what_the_set_is_and_how_it_was_made(tmp_path):
    folder = _make(tmp_path)
    card = DatasetCard.load(folder / "README.md")
    assert "in-context-learning" in card.data.tags
    for fragment in (
        "| task (function class) | `linear_regression` |",
        f"| input dimension d | {D} |",
        f"| points per prompt | {N} |",
        "| prompts | 32 |",
        f"| seed | {SEED} |",
        "sample_prompts",
        "python data_scripts/make_eval_sets.py --tasks linear_regression --n_dims 5",
    ):
        assert fragment in card.text, fragment
    # A repository card keeps its metadata and other sections; a set's section is replaced, not repeated.
    other = eval_sets.build_card("other_set", eval_sets.load(str(folder)))
    merged = eval_sets.build_card(folder.name, eval_sets.load(str(folder)), "cmd", existing=other)
    merged = eval_sets.build_card(folder.name, eval_sets.load(str(folder)), "cmd", existing=merged)
    assert merged.text.count(f"## {folder.name}\n") == 1 and "## other_set\n" in merged.text


def _hub_cache(root: Path, repo: str, folder: Path) -> None:
    """The HF hub cache as a download of ``repo`` leaves it, the set as config ``folder.name``
    (the layout ``Dataset.push_to_hub(repo, config_name=..., split="test")`` writes)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"datasets--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (snapshot / folder.name).mkdir(parents=True)
    eval_sets.load(str(folder)).to_parquet(str(snapshot / folder.name / "test-00000-of-00001.parquet"))
    (snapshot / "README.md").write_text((folder / "README.md").read_text())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


def test_hub_id_loads_offline_from_the_hf_cache(tiny_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # conftest: no network
    folder = _make(tmp_path / "sets")
    _hub_cache(tmp_path / "hub", "someone/icl-eval-sets", folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)

    common = [
        "--model",
        str(model_dir),
        "--baselines",
        "least_squares",
        "--bootstrap_samples",
        "10",
        "--quiet",
    ]
    for name, source in (("folder", str(folder)), ("hub", f"someone/icl-eval-sets:{folder.name}")):
        assert ev.main([*common, "--output_dir", str(tmp_path / name), "--eval_set", source]) == 0
    folder_result = json.loads((tmp_path / "folder/results.json").read_text())
    hub_result = json.loads((tmp_path / "hub/results.json").read_text())
    assert hub_result["curves"] == folder_result["curves"] and hub_result["metadata"]["n_prompts"] == 32
    prompts, metadata = ev.load_eval_set("someone/icl-eval-sets")  # the repository's only config
    assert metadata == {**ev.load_eval_set(str(folder))[1]} and prompts.xs.shape == (32, N, D)
    with pytest.raises(ev.EvaluationError, match="no eval set 'nope'"):
        ev.load_eval_set("someone/icl-eval-sets:nope")
