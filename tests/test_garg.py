"""Garg et al. interop: their TransformerModel, saved as their runs save it, converts into an
ICLModel folder that predicts the same, loads with AutoModel and evaluates with the CLI."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModel, GPT2Config, GPT2Model

from icl_conml import evaluation as ev
from icl_conml.garg import main as convert_main
from icl_conml.garg import read_config
from icl_conml.modeling import ICLModel

N_DIMS, N_POSITIONS, N_EMBD, N_LAYER, N_HEAD = 5, 12, 32, 2, 2


class TheirTransformer(nn.Module):
    """dtsip/in-context-learning's TransformerModel (src/models.py), rebuilt for the test."""

    def __init__(self, n_dims: int, n_positions: int, n_embd: int, n_layer: int, n_head: int) -> None:
        super().__init__()
        configuration = GPT2Config(
            n_positions=2 * n_positions,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
        )
        configuration._attn_implementation = "eager"  # transformers 4.17's attention
        self._read_in = nn.Linear(n_dims, n_embd)
        self._backbone = GPT2Model(configuration)
        self._read_out = nn.Linear(n_embd, 1)

    @staticmethod
    def _combine(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        batch, points, dim = xs.shape
        ys_wide = torch.cat((ys.view(batch, points, 1), torch.zeros(batch, points, dim - 1)), axis=2)
        return torch.stack((xs, ys_wide), dim=2).view(batch, 2 * points, dim)

    def forward(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        output = self._backbone(inputs_embeds=self._read_in(self._combine(xs, ys))).last_hidden_state
        return self._read_out(output)[:, ::2, 0]  # predict only on xs


def _their_run(
    folder: Path, task: str = "linear_regression", task_kwargs: dict | None = None
) -> TheirTransformer:
    """A trained-looking model saved as their train.py saves state.pt, plus the run's config.yaml."""
    torch.manual_seed(0)
    model = TheirTransformer(N_DIMS, N_POSITIONS, N_EMBD, N_LAYER, N_HEAD).eval()
    with torch.no_grad():  # move away from GPT-2's small init so that predictions vary a lot
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    state = dict(model.state_dict())
    for layer in range(N_LAYER):  # what transformers 4.17's GPT2Attention kept in the state dict
        positions = 2 * N_POSITIONS
        state[f"_backbone.h.{layer}.attn.bias"] = torch.tril(
            torch.ones(positions, positions, dtype=torch.bool)
        )[None, None]
        state[f"_backbone.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    folder.mkdir(parents=True)
    torch.save(
        {"model_state_dict": state, "optimizer_state_dict": {}, "train_step": 5000}, folder / "state.pt"
    )
    config = {
        "model": {
            "family": "gpt2",
            "n_dims": N_DIMS,
            "n_positions": N_POSITIONS,
            "n_embd": N_EMBD,
            "n_layer": N_LAYER,
            "n_head": N_HEAD,
        },
        "training": {
            "task": task,
            "task_kwargs": task_kwargs or {},
            "curriculum": {"dims": {"end": N_DIMS}, "points": {"end": 10}},
        },
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return model


def test_converted_checkpoint_predicts_as_theirs_and_evaluates(tmp_path, capsys):
    theirs = _their_run(tmp_path / "run")
    out = tmp_path / "converted"
    assert convert_main([str(tmp_path / "run/state.pt"), str(tmp_path / "run/config.yaml"), str(out)]) == 0
    assert "--n_points 10" in capsys.readouterr().out

    ours = AutoModel.from_pretrained(out)
    assert isinstance(ours, ICLModel) and ours.config.n_positions == N_POSITIONS
    assert ours.backbone.wpe.weight.shape[0] == 2 * N_POSITIONS  # their table, no invented row
    generator = torch.Generator().manual_seed(1)
    xs = torch.randn(64, N_POSITIONS, N_DIMS, generator=generator)
    ys = torch.randn(64, N_POSITIONS, generator=generator) * 2
    with torch.no_grad():
        expected = theirs(xs, ys)
        predicted = ours(xs=xs, ys=ys).predictions
        sdpa = ICLModel.from_pretrained(out, attn_implementation="sdpa").eval()(xs=xs, ys=ys).predictions
    assert expected.abs().mean() > 0.1  # a non-degenerate function of the prompt
    torch.testing.assert_close(predicted, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa, expected, atol=1e-5, rtol=0)
    with torch.no_grad():  # shorter prompts too (positions are read from the same table)
        torch.testing.assert_close(
            ours(xs=xs[:, :7], ys=ys[:, :7]).predictions, theirs(xs[:, :7], ys[:, :7]), atol=1e-5, rtol=0
        )

    assert "train step 5000" in (out / "README.md").read_text()
    argv = ["--model", str(out), "--output_dir", str(tmp_path / "eval"), "--n_prompts", "32"]
    assert ev.main([*argv, "--n_points", "10", "--bootstrap_samples", "10", "--quiet"]) == 0
    results = json.loads((tmp_path / "eval/results.json").read_text())
    assert results["metadata"]["task"] == "linear_regression" and len(results["curves"]["model"]) == 10


def test_task_names_map_and_bad_inputs_are_one_line(tmp_path, capsys):
    _their_run(tmp_path / "relu", task="relu_2nn_regression", task_kwargs={"hidden_layer_size": 8})
    settings = read_config(tmp_path / "relu/config.yaml")
    assert settings["task"] == "relu_2nn" and settings["task_kwargs"] == {"hidden_size": 8}
    out = tmp_path / "relu_converted"
    assert convert_main([str(tmp_path / "relu/state.pt"), str(tmp_path / "relu/config.yaml"), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "relu_2nn" and config["task_kwargs"] == {"hidden_size": 8}
    capsys.readouterr()

    wrong = tmp_path / "wrong.yaml"  # another run's config: the shapes do not match
    wrong.write_text((tmp_path / "relu/config.yaml").read_text().replace(f"n_embd: {N_EMBD}", "n_embd: 64"))
    assert convert_main([str(tmp_path / "relu/state.pt"), str(wrong), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass the run's own config.yaml" in err[0]
    assert convert_main([str(tmp_path / "relu/config.yaml"), str(wrong), str(tmp_path / "y")]) == 2
    assert "cannot load" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["linear_regression", "sparse_linear_regression", "decision_tree"])
def test_their_task_names_are_ours(tmp_path, name):
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"n_dims": 5, "n_positions": 11, "n_embd": 8, "n_layer": 1, "n_head": 1},
                "training": {"task": name},
            }
        )
    )
    assert read_config(tmp_path / "c.yaml")["task"] == name
