"""Few-shot evaluation: statistics on curves with known answers, the one-forward curve, OOD
prompts against least-squares theory, eval sets, the CLI (files, errors), compare, and the
curve summary the Trainer logs during a real (tiny) training run."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from icl_conml import ICLConfig, ICLModel, __version__, data
from icl_conml import evaluation as ev
from icl_conml.baselines import least_squares
from icl_conml.data import PromptError
from icl_conml.errors import UserError
from icl_conml.tasks import get_task


def tiny(seed: int = 0, n_dims: int = 3, n_positions: int = 7, task: str = "linear_regression") -> ICLModel:
    torch.manual_seed(seed)
    config = ICLConfig(n_dims=n_dims, n_positions=n_positions, n_embd=16, n_layer=1, n_head=2, task=task)
    return ICLModel(config).eval()


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("models")
    paths = []
    for seed in range(3):
        tiny(seed).save_pretrained(root / f"m{seed}")
        paths.append(str(root / f"m{seed}"))
    return paths


# ---- statistics with known answers -----------------------------------------------------------------
def test_needed_context_length():
    assert ev.needed_context_length([1.0, 0.5, 0.09, 0.2, 0.05], 0.1) == 2
    assert ev.needed_context_length([1.0, 0.5, 0.1], 0.1) == 2  # inclusive
    assert ev.needed_context_length([1.0, 0.5, 0.2], 0.1) is None
    assert ev.curve_summary([1.0, 0.6, 0.3, 0.05, 0.04, 0.02, 0.0], n_dims=2) == {
        "error_at_d": 0.3,
        "error_at_2d": 0.04,
        "needed_context_length": 3,
    }
    assert ev.curve_summary([1.0, 0.6, 0.3], n_dims=2) == {"error_at_d": 0.3, "needed_context_length": -1}


def test_table5_metrics_on_known_curves():
    a = torch.tensor([1.0, 0.5, 0.2, 0.1, 0.1])
    b = torch.tensor([1.0, 0.6, 0.3, 0.25, 0.3])
    rel, spare = ev.table5_metrics(a, b)
    assert rel.item() == pytest.approx(0.1 / 0.25)
    assert spare.item() == 2 - 3  # A reaches B's best (0.25 at k=3) at k=2: one shot fewer
    rel, spare = ev.table5_metrics(b, a)
    assert rel.item() == pytest.approx(2.5) and math.isnan(spare.item())  # B never reaches 0.1: undefined
    rel, spare = ev.table5_metrics(torch.stack([a, b]), torch.stack([b, b]))  # batched
    assert spare.tolist() == [-1.0, 0.0] and rel[1].item() == 1.0


def _constant_errors(curve: list[float], n_prompts: int = 50) -> torch.Tensor:
    return torch.tensor(curve).expand(n_prompts, -1).clone()


def test_compare_counts_undefined_shot_spare_and_uses_seed_averaged_curves():
    a = [_constant_errors([1.0, 0.5, 0.2, 0.1]), _constant_errors([1.0, 0.9, 0.8, 0.7])]
    b = [_constant_errors([1.0, 0.6, 0.3, 0.25]), _constant_errors([1.0, 0.6, 0.3, 0.25])]
    result = ev.compare_errors(a, b, bootstrap_samples=50)
    assert [p["shot_spare"] for p in result["pairs"]] == [-1, None]
    assert [p["rel_min_error"] for p in result["pairs"]] == pytest.approx([0.4, 2.8])
    spare = result["over_seeds"]["shot_spare"]
    assert (spare["n_defined"], spare["n_undefined"], spare["mean"]) == (1, 1, -1.0)
    rel = result["over_seeds"]["rel_min_error"]
    assert rel["mean"] == pytest.approx(1.6) and rel["std"] == pytest.approx(math.sqrt(2 * 1.2**2))
    averaged = result["seed_averaged_curves"]  # A's mean curve [1, .7, .5, .4] vs B's best .25
    assert averaged["rel_min_error"] == pytest.approx(0.4 / 0.25) and averaged["shot_spare"] is None
    assert result["pairs"][1]["shot_spare_interval"]["undefined_fraction"] == 1.0
    with pytest.raises(ev.EvaluationError, match="pairs models by seed"):
        ev.compare_errors(a, b[:1])


def test_bootstrap_interval_brackets_the_mean_and_resamples_are_paired():
    errors = torch.rand(400, 6, generator=torch.Generator().manual_seed(0))
    summary = ev.curve_with_interval(errors, n_samples=500, seed=1)
    for low, mean, high in zip(summary["low"], summary["mean"], summary["high"], strict=True):
        assert low < mean < high and high - low < 0.1
    torch.testing.assert_close(ev.bootstrap_means(errors, 50, 3), ev.bootstrap_means(errors, 50, 3))
    rel, spare = ev.table5_metrics(
        ev.bootstrap_means(errors, 50, 3), ev.bootstrap_means(errors.clone(), 50, 3)
    )
    assert (rel == 1).all() and (spare == 0).all()  # same prompts resampled alike: A ≡ B exactly


# ---- model curve and prompts -----------------------------------------------------------------------------
def test_one_forward_gives_the_same_curve_as_a_forward_per_prefix():
    model = tiny()
    task = get_task("linear_regression", 3)
    prompts = ev.sample_prompts(task, 20, 7, seed=0)
    one_forward = ev.model_predictions(model, prompts, batch_size=8)
    with torch.no_grad():
        per_prefix = torch.stack(
            [model(xs=prompts.xs[:, : k + 1], ys=prompts.ys[:, : k + 1]).predictions[:, k] for k in range(7)],
            1,
        )
    torch.testing.assert_close(one_forward, per_prefix, atol=1e-5, rtol=1e-5)
    as_queries = ev.Prompts(prompts.xs, prompts.ys, prompts.xs.clone(), prompts.ys)  # the per-k path
    torch.testing.assert_close(
        ev.model_predictions(model, as_queries, batch_size=8), one_forward, atol=1e-5, rtol=1e-5
    )


def test_bfloat16_forward_is_close_to_float32():
    model = tiny()
    prompts = ev.sample_prompts(get_task("linear_regression", 3), 64, 7, seed=0)
    full = ev.model_predictions(model, prompts)
    half = ev.model_predictions(model, prompts, dtype="bfloat16")
    assert not torch.equal(half, full) and (half - full).abs().max().item() < 0.05
    with pytest.raises(ev.EvaluationError, match="--dtype 'float16'"):
        ev.model_predictions(model, prompts, dtype="float16")


def _least_squares_curve(ood: str | None, n_prompts: int = 3000, n_points: int = 8) -> torch.Tensor:
    task = get_task("linear_regression", 4)
    prompts = ev.sample_prompts(task, n_prompts, n_points, seed=0, ood=ood)
    errors = ev.errors_of(task, least_squares(prompts.xs, prompts.ys, prompts.queries), prompts)
    return errors.double().mean(0)


def test_ood_prompts_against_least_squares_theory():
    standard = _least_squares_curve(None)
    # Scaled prompts are normalised back by the factor²: least squares is scale-invariant.
    torch.testing.assert_close(_least_squares_curve("scale_y=3"), standard, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_least_squares_curve("scale_x=0.333"), standard, atol=1e-4, rtol=1e-4)
    # The minimum-norm fit lies in the span of the examples: 0 at an orthogonal query (error ≈ 1 for
    # every k < d; prompts are cut to d points), exact at a repeated one (k ≥ 1).
    orthogonal = _least_squares_curve("orthogonal_query")
    assert orthogonal.shape == (4,) and orthogonal.tolist() == pytest.approx([1.0] * 4, abs=0.07)
    assert _least_squares_curve("repeated_query")[1:].max().item() < 1e-8
    # Noise of std 1 on every label adds σ²/d = 1/4 to the error at k = 0.
    assert _least_squares_curve("noisy_y=1.0")[0].item() == pytest.approx(1.25, abs=0.07)
    # Orthant contexts, Gaussian queries: determined fits are still exact; below d worse than standard.
    orthant = _least_squares_curve("orthant")
    assert orthant[5:].max().item() < 1e-8 and orthant[2].item() > standard[2].item()
    skewed = ev.sample_prompts(get_task("linear_regression", 4), 3000, 8, seed=0, ood="skewed")
    assert skewed.xs.square().sum(-1).mean().item() == pytest.approx(4, rel=0.05)  # trace d kept


def test_ood_flags_are_checked():
    # data.py owns the shifts (eval sets use them without the evaluation): its own one-line error, exit 2.
    with pytest.raises(PromptError, match="linear function classes"):
        ev.sample_prompts(get_task("relu_2nn", 3), 4, 5, seed=0, ood="orthant")
    with pytest.raises(PromptError, match="needs a factor"):
        ev.parse_ood("scale_x")
    with pytest.raises(PromptError, match="unknown --ood 'rotated'") as raised:
        data.sample_prompts(get_task("linear_regression", 3), 4, 5, seed=0, ood="rotated")
    assert isinstance(raised.value, UserError) and raised.value.exit_code == 2
    # The evaluation reports it as its own error (same line).
    model = ICLModel(ICLConfig(n_dims=3, n_positions=5, n_embd=16, n_layer=1, n_head=2, task="relu_2nn"))
    with pytest.raises(ev.EvaluationError, match="linear function classes"):
        ev.resolve_setting(model.config, ev.EvaluationArguments(ood="orthant", n_prompts=4))


# ---- CLI, eval sets, compare --------------------------------------------------------------------------
def test_cli_writes_results_table_and_plot(saved_models, tmp_path, capsys):
    out = tmp_path / "eval"
    code = ev.main(
        ["--model", saved_models[0], "--output_dir", str(out), "--n_prompts", "300", "--log_scale"]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["curves"]) == ["model", "least_squares", "averaging", "knn"]  # defaults from config
    assert results["k"] == list(range(7))
    for name, curve in results["curves"].items():
        interval = results["intervals"][name]
        assert len(curve) == len(interval["low"]) == len(interval["high"]) == 7
        assert all(lo <= m <= hi for lo, m, hi in zip(interval["low"], curve, interval["high"], strict=True))
    meta = results["metadata"]
    assert (meta["task"], meta["n_dims"], meta["n_points"], meta["n_prompts"]) == (
        "linear_regression",
        3,
        7,
        300,
    )
    assert meta["icl_conml_version"] == __version__ and meta["seed"] == 0 and meta["model"] == saved_models[0]
    needed = results["needed_context_length"]
    assert needed["absolute"]["least_squares"] == 3  # d = 3: exact from k = d on
    assert results["thresholds"]["best_reference"] == "least_squares"
    assert needed["within_best"]["least_squares"] == 3 and needed["within_best"]["model"] is None
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| k | model | least_squares |" in (out / "results.md").read_text()
    assert "wrote" in capsys.readouterr().out


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "no_such_model")
    proc = subprocess.run(  # the real command line: exit status and stderr
        [
            sys.executable,
            "-m",
            "icl_conml.evaluation",
            "--model",
            missing,
            "--output_dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"icl_conml: error: cannot load model '{missing}'"), (
        proc.stderr
    )
    # A Hub id that is neither cached nor reachable (offline): the same one line.
    assert ev.main(["--model", "nobody-xyz/not-a-cached-model", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load model 'nobody-xyz/not-a-cached-model'" in err[0]


def test_eval_set_roundtrip_and_mismatch(saved_models, tmp_path, capsys, load_script):
    script = load_script("data_scripts/make_eval_sets.py")
    common = [
        "--n_dims",
        "3",
        "--n_points",
        "7",
        "--n_prompts",
        "64",
        "--seed",
        "4",
        "--output_dir",
        str(tmp_path),
    ]
    assert script.main(["--tasks", "linear_regression", *common]) == 0
    assert script.main(["--tasks", "sparse_linear_regression", "--sparsity", "2", *common]) == 0
    folder = tmp_path / "linear_regression_d3_n7_s4"
    assert (
        ev.main(["--model", saved_models[0], "--output_dir", str(tmp_path / "a"), "--eval_set", str(folder)])
        == 0
    )
    from_set = json.loads((tmp_path / "a" / "results.json").read_text())
    fresh = ev.evaluate_model(
        saved_models[0], ev.EvaluationArguments(n_prompts=64, seed=4)
    )  # the same prompts, drawn again
    assert from_set["curves"] == fresh["curves"] and from_set["metadata"]["eval_set"] == str(folder)
    capsys.readouterr()
    wrong = tmp_path / "sparse_linear_regression_d3_n7_s4"
    assert (
        ev.main(["--model", saved_models[0], "--output_dir", str(tmp_path / "b"), "--eval_set", str(wrong)])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds sparse_linear_regression prompts of dimension 3" in err[0]


def test_compare_cli_pairs_models_by_seed(saved_models, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--models", *saved_models[:2], "--against", saved_models[2], saved_models[0]]
    assert ev.main([*args, "--output_dir", str(out), "--n_prompts", "100", "--labels", "ConML", "ICL"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert len(result["pairs"]) == 2 and result["metadata"]["labels"] == ["ConML", "ICL"]
    pair = result["pairs"][1]  # A_1 = m1 against B_1 = m0: different models, both metrics present
    assert pair["rel_min_error"] > 0
    spare = result["over_seeds"]["shot_spare"]
    assert spare["n_defined"] + spare["n_undefined"] == 2
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG" and "Shot Spare" in (
        out / "compare.md"
    ).read_text()
    capsys.readouterr()
    assert (
        ev.main(
            ["compare", "--models", *saved_models[:2], "--against", saved_models[2], "--output_dir", str(out)]
        )
        == 2
    )
    assert "pairs models by seed" in capsys.readouterr().err


def test_metric_module_loads_offline_by_path_and_matches():
    from icl_conml import metrics

    metric = metrics.load("icl_curve")
    predictions = torch.randn(16, 7, generator=torch.Generator().manual_seed(0))
    references = torch.randn(16, 7, generator=torch.Generator().manual_seed(1))
    result = metric.compute(predictions=predictions.tolist(), references=references.tolist(), n_dims=3)
    curve = get_task("linear_regression", 3).error(predictions, references).mean(0).tolist()
    assert result["curve"] == pytest.approx(curve)
    assert {k: v for k, v in result.items() if k != "curve"} == ev.curve_summary(curve, 3)


# ---- during training, and on a trained model ----------------------------------------------------------------
def test_training_logs_curve_summary_and_the_trained_model_beats_chance(tmp_path):
    from icl_conml.train import main as train_main

    out = tmp_path / "run"
    args = ["--n_dims", "1", "--n_points", "5", "--n_embd", "32", "--n_layer", "2", "--n_head", "2"]
    args += ["--per_device_train_batch_size", "64", "--learning_rate", "0.003", "--warmup_steps", "20"]
    args += [
        "--max_steps",
        "250",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "125",
        "--eval_n_prompts",
        "128",
    ]
    args += [
        "--logging_steps",
        "125",
        "--save_steps",
        "1000",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
    ]
    args += ["--conml_lambda", "0", "--output_dir", str(out)]
    assert train_main(args) == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [entry for entry in history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [125, 250]
    assert all({"eval_error_at_d", "eval_error_at_2d", "eval_needed_context_length"} <= set(e) for e in evals)
    results = ev.evaluate_model(str(out), ev.EvaluationArguments(n_prompts=500))
    curves = results["curves"]
    assert results["metadata"]["n_dims"] == 1 and len(curves["model"]) == 5  # defaults from its config
    # After 250 steps it uses the first examples (error at k = 1 far below k = 0, below averaging);
    # a tiny model this young still degrades at longer contexts, so only k = 1 is checked.
    assert curves["model"][1] < 0.7 * curves["model"][0] and curves["model"][1] < curves["averaging"][1]
    assert evals[-1]["eval_error_at_2d"] < evals[0]["eval_error_at_2d"] + 0.05
