"""ICLModel: shapes, causality, loss, Auto-class round trip, bf16."""

import torch
from transformers import AutoConfig, AutoModel

from icl_conml import ICLConfig, ICLModel


def prompts(batch=3, n=10, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, d, generator=gen), torch.randn(batch, n, generator=gen)


def test_predictions_shape_and_mse_loss(tiny_model):
    xs, ys = prompts()
    out = tiny_model(xs=xs, ys=ys)
    assert out.predictions.shape == ys.shape
    assert torch.allclose(out.loss, (out.predictions - ys).square().mean())
    assert tiny_model(xs=xs).loss is None


def test_model_is_causal(tiny_model):
    xs, ys = prompts()
    before = tiny_model(xs=xs, ys=ys).predictions
    xs2, ys2 = xs.clone(), ys.clone()
    j = 6
    xs2[:, j] += 1.0
    ys2[:, j] -= 3.0
    after = tiny_model(xs=xs2, ys=ys2).predictions
    assert torch.equal(before[:, :j], after[:, :j])
    assert not torch.allclose(before[:, j:], after[:, j:])
    # the prediction for y_j never uses y_j itself
    ys3 = ys.clone()
    ys3[:, j] = 100.0
    assert torch.equal(tiny_model(xs=xs, ys=ys3).predictions[:, : j + 1], before[:, : j + 1])


def test_defaults_no_dropout_no_cache(tiny_config):
    backbone = tiny_config.backbone_config
    assert backbone.resid_pdrop == backbone.embd_pdrop == backbone.attn_pdrop == 0.0
    assert backbone.use_cache is False
    assert backbone.n_positions >= 2 * tiny_config.n_positions + 1


def test_save_and_auto_model_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "icl_conml"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, ICLModel)
    xs, ys = prompts()
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    torch.testing.assert_close(loaded.eval()(xs=xs, ys=ys).predictions, tiny_model(xs=xs, ys=ys).predictions)
    again = ICLModel.from_pretrained(tmp_path)
    assert again.config.task == "linear_regression" and again.config.n_dims == 5


def test_bf16_forward_and_backward(tiny_config):
    model = ICLModel(tiny_config).to(torch.bfloat16)
    xs, ys = prompts()
    out = model(xs=xs, ys=ys)  # float32 inputs into a bf16 model
    out.loss.backward()
    assert out.predictions.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_task_loss_is_used(tiny_config):
    config = ICLConfig(**{**tiny_config.to_dict(), "task": "linear_classification"})
    model = ICLModel(config)
    xs, _ = prompts()
    ys = torch.sign(torch.randn(3, 10))
    out = model(xs=xs, ys=ys)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.predictions, (ys + 1) / 2)
    assert torch.allclose(out.loss, expected)


def test_the_fused_activation_is_gelu_new_to_rounding_and_survives_saving(tmp_path):
    """``activation_function=gelu_pytorch_tanh``: GPT-2's MLP runs the fused tanh-GELU kernel (the same
    function as gelu_new to rounding, faster on CPU), and a saved model loads back with it."""
    from transformers.activations import GELUTanh, NewGELUActivation

    config = ICLConfig(
        n_dims=5, n_positions=12, n_embd=32, n_layer=2, n_head=2, activation_function="gelu_pytorch_tanh"
    )
    model = ICLModel(config)
    assert {type(block.mlp.act) for block in model.backbone.h} == {GELUTanh}
    x = torch.randn(4, 9, 32) * 3
    assert torch.allclose(GELUTanh()(x), NewGELUActivation()(x), atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = ICLModel.from_pretrained(tmp_path)
    assert (
        loaded.config.activation_function
        == loaded.config.backbone_config.activation_function
        == "gelu_pytorch_tanh"
    )
    assert {type(block.mlp.act) for block in loaded.backbone.h} == {GELUTanh}
    xs, ys = torch.randn(2, 5, 5), torch.randn(2, 5)
    model.eval()
    loaded.eval()
    assert torch.allclose(model(xs=xs, ys=ys).predictions, loaded(xs=xs, ys=ys).predictions, atol=1e-6)


def test_gpt2_activation_is_bit_identical_to_transformers_gelu_new(tiny_model):
    """ExactNewGELU replaces GPT-2's gelu_new: the same floats forward and backward (training
    results must not change), with fewer temporaries."""
    from transformers.activations import NewGELUActivation

    from icl_conml.gelu import ExactNewGELU

    assert {type(block.mlp.act) for block in tiny_model.backbone.h} == {ExactNewGELU}
    reference = NewGELUActivation()
    for shape, scale in [((64, 23, 256), 1.0), ((7, 13, 33), 4.0), ((5,), 10.0)]:
        x = torch.randn(shape) * scale
        upstream = torch.randn(shape)
        ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours, ref = ExactNewGELU()(ours_x * 1.0), reference(ref_x * 1.0)  # non-leaf inputs, as in the MLP
        ours.backward(upstream)
        ref.backward(upstream)
        assert torch.equal(ours, ref) and torch.equal(ours_x.grad, ref_x.grad)
        with torch.no_grad():
            assert torch.equal(ExactNewGELU()(x), reference(x))
