"""The experiment command: a real paired study end to end, resumption, and the analysis."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from icl_conml.experiment import ExperimentError, load_spec, main, usable_cpus
from icl_conml.experiment.analysis import (
    analyze,
    check_pairing,
    load_records,
    mean_std,
    steps_to_reach,
    table5_pair,
    wilcoxon_signed_rank,
)
from icl_conml.experiment.records import expected_settings

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "recipes" / "experiments" / "cpu_base.yaml"


def write_spec(tmp_path: Path, **changes) -> Path:
    spec = {
        "name": "tiny",
        "base_recipe": str(BASE),
        "overrides": {
            "max_steps": 50,
            "save_steps": 20,
            "logging_steps": 10,
            "n_layer": 1,
            "n_embd": 16,
            "n_head": 2,
            "warmup_steps": 5,
        },
        "arms": {"plain": {"conml_lambda": 0.0}, "conml": {"conml_lambda": 0.5}},
        "seeds": [0, 1],
        "eval": {"n_prompts": 64, "every": 25, "thresholds": [2.0, 0.01], "bootstrap_samples": 50},
        "output_dir": str(tmp_path / "out"),
        "records_dir": str(tmp_path / "records"),
        **changes,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # the first arm is the reference
    return path


def run_experiment(spec: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "icl_conml.experiment", str(spec), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_a_two_seed_study_with_an_aa_control_runs_resumes_and_analyses(tmp_path):
    """The tiny A/A study: plain, ConML and the A/A control (plain with its initial weights moved
    by 1e-7), 2 seeds, interrupted once and resumed, then analysed against the noise floor."""
    arms = {
        "plain": {"conml_lambda": 0.0},
        "conml": {"conml_lambda": 0.5},
        "aa": {"conml_lambda": 0.0, "init_perturbation_std": 1e-7},
    }
    spec_path = write_spec(tmp_path, arms=arms, control_arm="aa")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    # Interrupt the study once its first record exists (the other runs are mid-way or not started).
    process = subprocess.Popen(
        [sys.executable, "-m", "icl_conml.experiment", str(spec_path), "--jobs", "1", "--no_analysis"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    records = tmp_path / "records"
    second_segments = tmp_path / "out" / "conml" / "seed0" / "experiment_segments.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (list(records.glob("*/seed*.json")) and second_segments.is_file()):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = list(records.glob("*/seed*.json"))
    assert len(first) == 1, "the study was interrupted after its first run"

    result = run_experiment(spec_path, "--jobs", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 of 6 runs have records" in result.stdout  # the finished run was not trained again
    assert sorted(p.relative_to(records).as_posix() for p in records.glob("*/seed*.json")) == [
        "aa/seed0.json",
        "aa/seed1.json",
        "conml/seed0.json",
        "conml/seed1.json",
        "plain/seed0.json",
        "plain/seed1.json",
    ]
    record = json.loads((records / "conml" / "seed1.json").read_text())
    assert record["recipe"]["conml_lambda"] == 0.5 and record["seed"] == 1
    assert record["attn_implementation"] == "eager"
    assert record["global_step"] == 50 and len(record["final_curve"]["mean"]) == 11
    assert [e["step"] for e in record["eval_history"]] == [25, 50]
    assert record["icl_conml_version"] and record["segments"]
    assert record["commit"] == record["segments"][-1]["commit"] and record["wall_seconds"] > 0
    assert record["wall_seconds_complete"] is True
    # The run killed mid-way keeps its first segment's provenance (written when it started), with
    # its unknown time said so; the resumed segment is complete.
    killed = json.loads((records / "conml" / "seed0.json").read_text())
    first_segment, resumed = killed["segments"]
    assert first_segment["commit"] == resumed["commit"] == killed["commit"] is not None
    assert first_segment["started_at"] <= resumed["started_at"]
    assert first_segment["exit"] is None and first_segment["seconds"] is None
    assert resumed["exit"] == 0 and killed["wall_seconds"] == resumed["seconds"] > 0
    assert killed["wall_seconds_complete"] is False

    # Pairing: the two arms of a seed started from the same weights and prompts, so their first
    # logged ICL losses differ only by what ConML changed in 10 steps (plain seeds 0 and 1 differ more).
    plain = [json.loads((records / "plain" / f"seed{s}.json").read_text()) for s in (0, 1)]
    assert plain[0]["final_curve"]["mean"] != plain[1]["final_curve"]["mean"]
    # The A/A run is plain moved by rounding-level noise: another run, as close as a rerun can be.
    aa = json.loads((records / "aa" / "seed0.json").read_text())
    assert aa["recipe"]["init_perturbation_std"] == 1e-7
    assert aa["final_curve"]["mean"] != plain[0]["final_curve"]["mean"]
    assert aa["final_curve"]["mean"] == pytest.approx(plain[0]["final_curve"]["mean"], rel=0.05)

    analysis = records / "tiny"  # each spec's report has its own folder: specs may share records
    results = json.loads((analysis / "results.json").read_text())
    comparison = results["comparisons"][0]
    assert comparison["arm"] == "conml" and comparison["seeds"] == [0, 1]
    report = (analysis / "results.md").read_text()
    assert report.startswith("# Experiment `tiny`") and "| aa (A/A control) | 2 |" in report
    assert "## Against the A/A control `aa` (the noise floor)" in report
    assert [entry["arm"] for entry in results["against_control"]["arms"]] == ["conml"]
    for image in ("curves.png", "paired.png", "training.png"):
        assert (analysis / image).stat().st_size > 0

    # A re-run has nothing left to train; --analyze_only rebuilds the report from records alone.
    again = run_experiment(spec_path, "--analyze_only")
    assert again.returncode == 0 and "analysis written" in again.stdout


@pytest.mark.slow
def test_a_longer_spec_on_the_same_runs_continues_them_exactly(tmp_path):
    """A spec sharing output_dir with a finished shorter one extends its runs from their last
    checkpoint; the extended runs equal runs trained to the longer length at once."""
    tiny = {"save_steps": 10, "logging_steps": 10, "n_layer": 1, "n_embd": 16, "n_head": 2, "warmup_steps": 5}
    common = {"seeds": [0], "eval": {"n_prompts": 64, "every": 10, "bootstrap_samples": 20}}

    def spec(name: str, steps: int, out: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        return write_spec(
            folder,
            name=name,
            overrides={**tiny, "max_steps": steps},
            output_dir=str(tmp_path / out),
            records_dir=str(tmp_path / f"records_{name}"),
            **common,
        )

    short, extended, direct = (
        spec("short", 20, "out"),
        spec("extended", 30, "out"),
        spec("direct", 30, "direct"),
    )
    for path in (short, extended, direct):
        result = run_experiment(path, "--no_analysis")
        assert result.returncode == 0, result.stderr[-2000:]

    def record(name: str, arm: str) -> dict:
        return json.loads((tmp_path / f"records_{name}" / arm / "seed0.json").read_text())

    for arm in ("plain", "conml"):
        assert record("short", arm)["global_step"] == 20
        longer = record("extended", arm)
        assert longer["global_step"] == 30 and len(longer["segments"]) == 2
        assert [entry["step"] for entry in longer["eval_history"]] == [10, 20, 30]
        assert longer["final_curve"] == record("direct", arm)["final_curve"]
        assert longer["eval_history"] == record("direct", arm)["eval_history"]

    # The shorter spec, asked again without its records, refuses the runs now trained past it.
    for path in (tmp_path / "records_short").glob("*/seed0.json"):
        path.unlink()
    result = run_experiment(short, "--no_analysis")
    assert result.returncode == 1
    assert (
        "trained to step 30, past this spec's max_steps=20; give the spec another output_dir" in result.stdout
    )


def test_shot_spare_is_censored_not_dropped():
    reference = [1.0, 0.5, 0.2, 0.1, 0.15]  # minimum 0.1 at k = 3
    reaches = table5_pair([1.0, 0.3, 0.1, 0.05, 0.05], reference)
    assert reaches["shot_spare"] == -1 and not reaches["censored"]
    assert math.isclose(reaches["rel_min_error"], 0.5)
    never = table5_pair([1.0, 0.6, 0.3, 0.2, 0.2], reference)
    assert never["censored"] and never["shot_spare"] is None and never["shot_spare_bound"] == 1
    assert math.isclose(never["rel_min_error"], 2.0)


def test_seed_statistics_median_averages_the_two_middle_values():
    stats = mean_std([0.3, 1.0, 0.9, 5.0])
    assert stats["median"] == pytest.approx(0.95) and stats["mean"] == pytest.approx(1.8)


def test_wilcoxon_is_exact():
    assert wilcoxon_signed_rank([1, 2, 3, 4, 5])["p_value"] == pytest.approx(2 / 32)
    assert wilcoxon_signed_rank([-1, 2, -3, 4, -5, 6])["p_value"] == pytest.approx(1.0, abs=0.2)
    assert wilcoxon_signed_rank([0, 0])["p_value"] is None
    # Ties get mean ranks: |d| = 1, 1, 2 -> ranks 1.5, 1.5, 3; all positive -> p = 2/8.
    assert wilcoxon_signed_rank([1, 1, 2])["p_value"] == pytest.approx(0.25)


def test_steps_to_reach_reads_the_first_evaluation_below_the_threshold():
    history = [{"step": 10, "curve": [1.0, 0.5]}, {"step": 20, "curve": [1.0, 0.2]}]
    assert steps_to_reach(history, 1, 0.3) == 20
    assert steps_to_reach(history, 1, 0.1) is None


def _fake_record(spec, arm: str, seed: int, curve: list[float], **changes) -> dict:
    """A record as the experiment writes it for ``arm``/``seed`` of ``spec`` (its resolved recipe),
    with made-up curves; ``changes`` alter its recipe."""
    recipe = {**expected_settings(spec)[arm], "seed": seed, **changes}
    return {
        "arm": arm,
        "seed": seed,
        "recipe": recipe,
        "attn_implementation": "eager",
        "max_steps": recipe["max_steps"],
        "n_dims": 2,
        "eval": {"n_prompts": spec.eval.n_prompts, "seed": spec.eval.seed, "eval_set": None},
        "final_curve": {"mean": curve},
        "eval_history": [{"step": 100, "curve": curve}],
        "wall_seconds": 1.0,
        "commit": "abc",
    }


def _write_records(spec, records: dict) -> None:
    for (arm, seed), record in records.items():
        path = spec.records / arm / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))


def test_analysis_refuses_to_pair_runs_whose_settings_differ(tmp_path):
    spec = load_spec(write_spec(tmp_path, seeds=[0, 1]))
    records = {
        ("plain", 0): _fake_record(spec, "plain", 0, [1.0, 0.5, 0.2, 0.1, 0.1]),
        ("conml", 0): _fake_record(spec, "conml", 0, [1.0, 0.4, 0.1, 0.05, 0.05]),
        ("plain", 1): _fake_record(spec, "plain", 1, [1.0, 0.5, 0.2, 0.1, 0.1]),
        ("conml", 1): _fake_record(spec, "conml", 1, [1.0, 0.6, 0.3, 0.2, 0.2]),
    }
    _write_records(spec, records)
    report = analyze(spec, plots=False)
    comparison = json.loads((report.parent / "results.json").read_text())["comparisons"][0]
    assert comparison["shot_spare"]["n_defined"] == 1 and comparison["shot_spare"]["n_censored"] == 1
    assert comparison["shot_spare"]["std"] is None  # n/a below 2 defined pairs
    assert "> 1" in report.read_text()  # the censored pair is shown with its bound

    # A second spec over the same records (another arm) writes its own report beside the first.
    other = load_spec(
        write_spec(
            tmp_path, name="other", arms={"plain": {"conml_lambda": 0.0}, "conml": {"conml_lambda": 0.5}}
        )
    )
    other_report = analyze(other, plots=False)
    assert other_report.parent != report.parent and report.is_file() and other_report.is_file()

    # Runs that differ outside their arm's keys cannot be paired (here: the arm's records are
    # checked against the spec first, and both checks name the key).
    with pytest.raises(ExperimentError, match="learning_rate"):
        changed = dict(records)
        changed[("conml", 1)] = _fake_record(spec, "conml", 1, [1.0, 0.6], learning_rate=0.01)
        check_pairing(spec, changed)
    records[("conml", 1)]["recipe"]["learning_rate"] = 0.01
    _write_records(spec, records)
    with pytest.raises(ExperimentError, match=r"seed1.json was trained with other settings .*learning_rate"):
        load_records(spec)


def test_spec_errors_are_one_line(tmp_path, capsys):
    bad = write_spec(tmp_path, arms={"plain": {"conml_lambda": 0.0}})
    assert main([str(bad)]) == 2
    assert "at least 2 arm" in capsys.readouterr().err
    bad = write_spec(tmp_path, colour="blue")
    assert main([str(bad)]) == 2
    assert "unknown spec key" in capsys.readouterr().err
    bad = write_spec(tmp_path, name="plain")
    assert main([str(bad)]) == 2
    assert "also an arm's name" in capsys.readouterr().err


def test_slurm_array_has_one_task_per_run(tmp_path):
    spec_path = write_spec(tmp_path, slurm={"gres": "gpu:1", "time": "04:00:00"})
    assert main([str(spec_path), "--slurm"]) == 0
    script = (tmp_path / "out" / "slurm" / "tiny.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script and "#SBATCH --gres=gpu:1" in script
    assert '--run_index "$SLURM_ARRAY_TASK_ID"' in script
    assert f"--records_dir {tmp_path / 'records'} --output_dir {tmp_path / 'out'} " in script
    result = subprocess.run(["bash", "-n", str(tmp_path / "out" / "slurm" / "tiny.sbatch")])
    assert result.returncode == 0


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity API on this platform")
def test_threads_follow_the_cpus_this_process_may_use():
    """Under taskset or a SLURM cpuset, --jobs splits the CPUs it may use, not the machine's count."""
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})
        assert usable_cpus() == 1
    finally:
        os.sched_setaffinity(0, allowed)
    assert usable_cpus() == len(allowed)


def test_every_shipped_spec_loads_and_each_arm_is_a_valid_recipe(monkeypatch):
    """A typo in a shipped study spec (a key, a value, an impossible setting) fails here, not hours in."""
    from icl_conml.recipe_parser import parse_recipe

    monkeypatch.chdir(REPO)  # specs name their base recipe relative to the repository
    specs = [
        p
        for p in sorted((REPO / "recipes" / "experiments").glob("*.yaml"))
        if "arms" in yaml.safe_load(p.read_text())
    ]
    assert len(specs) >= 10
    for path in specs:
        spec = load_spec(path)
        for run in spec.runs()[: len(spec.arms)]:  # every arm of the first seed
            recipe = parse_recipe(run.train_args())
            assert recipe.training.seed == spec.seeds[0], path.name


def _write_yaml_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "raw.yaml"
    path.write_text(text)
    return path


def test_the_whole_spec_is_checked_before_anything_trains(tmp_path, capsys):
    """Issue 22 items 3 and 14: every problem of a spec is one line, found before any run starts."""
    # An alias bomb (9 nested aliases: billions of items if expanded) is refused at its first anchor.
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9)
    )
    assert main([str(_write_yaml_text(tmp_path, bomb)), "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert "uses the YAML anchor &a (line 1); specs take no anchors or aliases" in err
    assert len(err.strip().splitlines()) == 1

    # A duplicate arm name (YAML keeps the last one) is refused, naming both lines.
    duplicate = write_spec(tmp_path).read_text().replace("  conml:", "  plain:")
    assert main([str(_write_yaml_text(tmp_path, duplicate)), "--dry_run"]) == 2
    assert "sets 'plain' twice (lines" in capsys.readouterr().err

    # Seeds are integers: strings ("0" and "00" would both train seed 0) and booleans are refused.
    for seeds, shown in ((["0", "00"], "'0'"), ([0, "0"], "'0'"), ([True, 2], "True"), ([1, 1], None)):
        assert main([str(write_spec(tmp_path, seeds=seeds)), "--dry_run"]) == 2
        err = capsys.readouterr().err
        assert (f"seed {shown} is not a non-negative integer" if shown else "repeat a seed") in err, err

    # An arm name is a folder name.
    assert main([str(write_spec(tmp_path, arms={"plain": {}, "../x": {}})), "--dry_run"]) == 2
    assert "arm name '../x' must be a folder name" in capsys.readouterr().err

    # An unknown key in the second arm is found before the first arm trains.
    typo = write_spec(tmp_path, arms={"plain": {"conml_lambda": 0.0}, "conml": {"conml_lamda": 0.5}})
    assert main([str(typo)]) == 2
    err = capsys.readouterr().err
    assert (
        "arm 'conml' is not a valid recipe: unknown option --conml_lamda; did you mean 'conml_lambda'?" in err
    )
    assert not (tmp_path / "out").exists()


def _record_spec(tmp_path: Path):
    spec = load_spec(write_spec(tmp_path, seeds=[0]))
    records = {
        ("plain", 0): _fake_record(spec, "plain", 0, [1.0, 0.5, 0.2, 0.1, 0.1]),
        ("conml", 0): _fake_record(spec, "conml", 0, [1.0, 0.4, 0.1, 0.05, 0.05]),
    }
    return spec, records


def test_a_record_is_reused_only_if_it_is_this_specs_run(tmp_path, capsys):
    """Issue 22 item 13: another spec's run of the same arm name (other settings) is refused in
    one line, by the runner and by the analysis; a record from older code that lacks keys added
    since (init_perturbation_std, ...) is the same run when those keys are at their defaults."""
    spec, records = _record_spec(tmp_path)
    old = dict(records[("conml", 0)]["recipe"])
    for key in ("init_perturbation_std", "conml_lambda_start", "conml_lambda_warmup", "task_kwargs"):
        old.pop(key, None)  # written before these keys existed
    records[("conml", 0)]["recipe"] = old
    _write_records(spec, records)
    assert main([str(spec.path), "--dry_run"]) == 0
    assert capsys.readouterr().out.count("done ") == 2
    assert main([str(spec.path), "--analyze_only"]) == 0
    capsys.readouterr()

    for changes, shown in (
        ({"conml_lambda": 0.02}, "conml_lambda 0.02 (record) vs 0.5 (spec)"),
        ({"init_perturbation_std": 1e-7}, "init_perturbation_std 1e-07 (record) vs 0.0 (spec)"),
        ({"max_steps": 8000}, "max_steps 8000 (record) vs 50 (spec)"),
    ):
        records[("conml", 0)] = _fake_record(spec, "conml", 0, [1.0, 0.5], **changes)
        _write_records(spec, records)
        for mode in ("--dry_run", "--analyze_only"):
            assert main([str(spec.path), mode]) == 2
            err = capsys.readouterr().err
            assert f"record {spec.records / 'conml' / 'seed0.json'} was trained with other settings" in err
            assert shown in err and "--records_dir" in err and len(err.strip().splitlines()) == 1


def test_a_damaged_record_is_one_line_naming_the_file(tmp_path, capsys):
    """Issue 22 item 15: a truncated record stops the study and the analysis in one line."""
    spec, records = _record_spec(tmp_path)
    _write_records(spec, records)
    path = spec.records / "plain" / "seed0.json"
    path.write_text(path.read_text()[:100])
    for mode in ("--dry_run", "--analyze_only", "--no_analysis"):
        assert main([str(spec.path), mode]) == 2
        err = capsys.readouterr().err
        assert f"record {path} is not valid JSON" in err and f"delete {path} and re-run" in err
    path.write_text(json.dumps({"arm": "plain"}))
    assert main([str(spec.path), "--analyze_only"]) == 2
    assert "lacks seed, recipe, n_dims, final_curve, eval_history" in capsys.readouterr().err


def test_packaged_specs_run_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    """Issue 25 item 2: a shipped spec by name, from another folder, finds its repository's records;
    --records_dir starts the study afresh in another folder (its runs beside the records)."""
    monkeypatch.chdir(tmp_path)
    assert main(["lr_paper_cpu", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "done plain/seed0: " in out and "done paper/seed9: " in out  # the committed records
    assert f" {REPO / 'recipes' / 'experiments' / 'cpu_base.yaml'} " in out
    assert f"--output_dir {REPO / 'runs' / 'experiments' / 'lr_cpu' / 'plain' / 'seed0'} " in out

    assert main(["lr_paper_cpu.yaml", "--dry_run", "--records_dir", "fresh"]) == 0
    out = capsys.readouterr().out
    assert "done" not in out and out.count("todo ") == len(
        load_spec(REPO / "recipes/experiments/lr_paper_cpu.yaml").runs()
    )
    assert "--output_dir fresh/runs/plain/seed0 " in out
    assert main(["lr_paper_cpu", "--dry_run", "--records_dir", "fresh", "--output_dir", "elsewhere"]) == 0
    assert "--output_dir elsewhere/plain/seed0 " in capsys.readouterr().out

    assert main(["no_such_spec", "--dry_run"]) == 2
    assert (
        "not found; pass the path of a spec YAML or the name of a packaged spec (" in capsys.readouterr().err
    )


def test_paths_in_a_spec_are_relative_to_its_folder(tmp_path, monkeypatch, capsys):
    """Issue 25 item 2: base_recipe, output_dir and records_dir of a spec are relative to the
    spec's folder wherever the command runs."""
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "base.yaml").write_text(BASE.read_text())
    spec = write_spec(folder, base_recipe="base.yaml", output_dir="runs", records_dir="records")
    monkeypatch.chdir(REPO)
    assert main([str(spec), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert f"icl_conml.train {folder / 'base.yaml'} " in out
    assert f"--output_dir {folder / 'runs' / 'plain' / 'seed0'} " in out
    assert load_spec(spec).records == folder / "records"


# ---- real processes: signals, two commands, refused attempts (issue 22 items 16 and 17) ----------
FAST = {"n_layer": 1, "n_embd": 16, "n_head": 2, "warmup_steps": 2, "per_device_train_batch_size": 8}


def _fast_spec(tmp_path: Path, steps: int, **overrides) -> Path:
    return write_spec(
        tmp_path,
        overrides={**FAST, "max_steps": steps, "logging_steps": 2, "save_steps": 1000, **overrides},
        seeds=[0],
        eval={"n_prompts": 32, "every": steps // 2, "thresholds": [2.0], "bootstrap_samples": 20},
    )


def _start(spec: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "icl_conml.experiment", str(spec), "--jobs", "1", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the test can end the whole group if an assertion fails
    )


def _wait_for_training(run_dir: Path, timeout: float = 300) -> int:
    """Wait until the run in run_dir has logged a training step; returns its training pid."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = run_dir / "train.log"
        if log.is_file() and re.search(r"step [1-9]\d*/\d+: loss ", log.read_text(errors="replace")):
            return int(json.loads((run_dir / ".lock").read_text())["pid"])
        time.sleep(0.2)
    raise AssertionError(f"{run_dir} never started training")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_stop_signals_reach_the_training_runs_and_the_study_resumes(tmp_path):
    """SIGTERM, then Ctrl-C (SIGINT), to the experiment process alone: the training child saves a
    checkpoint and stops (no orphan), no other run starts, the command exits 75 (130) with the runs
    labelled interrupted, and the next command resumes them to the end."""
    spec = _fast_spec(tmp_path, 60)
    out = tmp_path / "out"
    for signum, code, run in ((signal.SIGTERM, 75, "plain"), (signal.SIGINT, 130, "conml")):
        process = _start(spec, "--no_analysis")
        try:
            child = _wait_for_training(out / run / "seed0")
            os.kill(process.pid, signum)
            stdout, stderr = process.communicate(timeout=300)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        assert process.returncode == code, stderr[-2000:]
        assert f"[experiment] interrupted {run}/seed0" in stdout and "FAILED" not in stdout + stderr
        assert "icl_conml: interrupted: 1 run(s) stopped" in stderr
        assert _gone(child), "the training child outlived the experiment command"
        assert list((out / run / "seed0").glob("checkpoint-*")), "the stopped run saved no checkpoint"
        if run == "plain":
            assert not (out / "conml").exists(), "a run started after the stop request"
    result = run_experiment(spec, "--no_analysis")
    assert result.returncode == 0, result.stderr[-2000:]
    for arm in ("plain", "conml"):
        record = json.loads((tmp_path / "records" / arm / "seed0.json").read_text())
        assert record["global_step"] == 60
        assert [s["exit"] for s in record["segments"]][-1] == 0 and record["segments"][-2]["exit"] == 75


@pytest.mark.slow
def test_two_commands_on_one_spec_share_its_runs(tmp_path):
    """Two experiment commands on one spec at once: each run is trained once (by one of them),
    neither reports the other's runs as failures, and both end with every record."""
    spec = _fast_spec(tmp_path, 10)
    first, second = _start(spec, "--no_analysis"), _start(spec, "--no_analysis")
    try:
        outputs = [process.communicate(timeout=600) for process in (first, second)]
    finally:
        for process in (first, second):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    for process, (stdout, stderr) in zip((first, second), outputs, strict=True):
        assert process.returncode == 0, stdout[-1500:] + stderr[-1500:]
        assert "FAILED" not in stdout
    for arm in ("plain", "conml"):
        lines = (tmp_path / "out" / arm / "seed0" / "experiment_segments.jsonl").read_text().splitlines()
        assert sum(json.loads(line).get("event") == "start" for line in lines) == 1, lines
        assert (tmp_path / "records" / arm / "seed0.json").is_file()


@pytest.mark.slow
def test_a_refused_attempt_fails_and_costs_no_wall_time(tmp_path):
    """A run whose folder another process holds is refused by training (exit 2): the experiment
    reports it, and the run's record later counts only the attempt that trained."""
    from icl_conml.runs.lock import OutputDirLock

    spec = _fast_spec(tmp_path, 10)
    folder = tmp_path / "out" / "plain" / "seed0"
    folder.mkdir(parents=True)
    lock = OutputDirLock(folder)
    lock.acquire()
    try:
        refused = run_experiment(spec, "--run_index", "0")
    finally:
        lock.release()
    assert refused.returncode == 1
    assert "FAILED plain/seed0: run plain/seed0 failed (exit 2)" in refused.stdout
    assert "1 run(s) failed" in refused.stderr
    result = run_experiment(spec, "--run_index", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "records" / "plain" / "seed0.json").read_text())
    assert [segment["exit"] for segment in record["segments"]] == [2, 0]
    assert record["wall_seconds"] == record["segments"][1]["seconds"]


def test_the_aa_control_shows_the_noise_floor_and_tests_each_arm_against_it(tmp_path):
    """Issue 23: with control_arm, the report compares each arm with the A/A arm seed by seed."""
    seeds = list(range(8))
    arms = {
        "plain": {"conml_lambda": 0.0},
        "conml": {"conml_lambda": 0.5},
        "same": {"conml_lambda": 0.1},
        "aa": {"conml_lambda": 0.0, "init_perturbation_std": 1e-7},
    }
    spec = load_spec(write_spec(tmp_path, arms=arms, seeds=seeds, control_arm="aa"))
    records = {}
    for seed in seeds:
        wobble = 1 + 0.01 * (seed % 3 - 1)  # rounding-level differences, both directions
        base = [1.0, 0.5, 0.2, 0.1 * (1 + 0.02 * seed), 0.1 * (1 + 0.02 * seed)]
        curves = {
            "plain": base,
            "aa": [v * wobble for v in base],
            "conml": [v * 2.0 for v in base],  # twice the error on every seed
            "same": [v * (1 + 0.01 * ((seed + 1) % 3 - 1)) for v in base],  # like a rerun
        }
        for arm, curve in curves.items():
            records[(arm, seed)] = _fake_record(spec, arm, seed, curve)
    _write_records(spec, records)
    report = analyze(spec, plots=False)
    text = report.read_text()
    assert "| aa (A/A control) | 8 |" in text
    assert "## Against the A/A control `aa` (the noise floor)" in text
    control = json.loads((report.parent / "results.json").read_text())["against_control"]
    by_arm = {entry["arm"]: entry for entry in control["arms"]}
    assert set(by_arm) == {"conml", "same"}
    assert by_arm["conml"]["location_p"] == pytest.approx(2 / 2**8) and by_arm["conml"]["distinguishable"]
    assert by_arm["conml"]["arm_over_aa_geometric_mean"] == pytest.approx(2.0, rel=0.02)
    assert not by_arm["same"]["distinguishable"] and by_arm["same"]["location_p"] > 0.2
    assert "| conml | 8 | 2 |" in text and "| **yes** |" in text
    assert control["floor"]["rel_min_error"]["n"] == 8


def test_shot_spare_uses_a_relative_tolerance_and_the_report_says_so(tmp_path):
    """Issue 25 item 7: a minimum equal to the reference's up to 1e-6 is reached, not censored."""
    reference = [1.0, 0.5, 0.2, 0.1, 0.1]
    assert table5_pair([1.0, 0.5, 0.2, 0.1000001, 0.1000001], reference)["shot_spare"] == 0
    assert table5_pair([1.0, 0.5, 0.2, 0.1002, 0.1002], reference)["censored"]
    spec, records = _record_spec(tmp_path)
    _write_records(spec, records)
    assert "(relative tolerance 0.001)" in analyze(spec, plots=False).read_text()


def test_compare_pairs_models_by_the_experiments_rules(tmp_path, capsys):
    """Issue 25 item 4: compare refuses models that are not pairs (seed 42 at 8000 steps against
    seed 1 at 200), and one pair has no spread ("n/a", not "± 0")."""
    import torch

    from icl_conml import ICLConfig, ICLModel
    from icl_conml import evaluation as ev

    def model(name: str, seed: int, steps: int, **recipe) -> str:
        torch.manual_seed(seed)
        folder = tmp_path / name
        config = ICLConfig(n_dims=3, n_positions=7, n_embd=16, n_layer=1, n_head=2)
        ICLModel(config).save_pretrained(folder)
        settings = {"n_dims": 3, "seed": seed, "max_steps": steps, "learning_rate": 0.001, **recipe}
        (folder / "recipe.yaml").write_text(yaml.safe_dump(settings))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": steps}))
        return str(folder)

    out = str(tmp_path / "cmp")
    a42, b1 = model("a42", 42, 8000, conml_lambda=0.02), model("b1", 1, 200)
    b42, b1_long = model("b42", 42, 8000), model("b1x", 1, 8000)
    a1 = model("a1", 1, 8000, conml_lambda=0.02, learning_rate=0.01)
    capsys.readouterr()
    assert ev.main(["compare", "--models", a42, "--against", b1, "--output_dir", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"A {a42!r} (seed 42, 8000 steps) and B {b1!r} (seed 1, 200 steps) are not a pair" in err[0]

    assert (
        ev.main(["compare", "--models", a42, "--against", b42, "--output_dir", out, "--n_prompts", "32"]) == 0
    )
    assert (
        "± n/a" in (tmp_path / "cmp" / "compare.md").read_text()
        and "± 0 " not in (tmp_path / "cmp" / "compare.md").read_text()
    )
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["metadata"]["pairing"] == "checked"

    assert ev.main(["compare", "--models", a42, a1, "--against", b42, b1_long, "--output_dir", out]) == 2
    err = capsys.readouterr().err
    assert f"A models {a42!r} and {a1!r} differ outside their seed (learning_rate: 0.01 vs 0.001" in err


def test_a_spec_installed_inside_the_package_writes_under_the_working_directory(tmp_path, monkeypatch):
    """paths_relative_to: project in a wheel (the spec inside icl_conml/recipes/): no repository
    around it, so its relative paths are the working directory's, never site-packages."""
    import icl_conml
    from icl_conml.experiment.spec import path_base

    installed = Path(icl_conml.__file__).resolve().parent / "recipes" / "experiments" / "lr_paper_cpu.yaml"
    monkeypatch.chdir(tmp_path)
    assert path_base(installed, "project") == Path.cwd()
    assert path_base(REPO / "recipes" / "experiments" / "lr_paper_cpu.yaml", "project") == REPO
    with pytest.raises(ExperimentError, match="needs the spec inside a project's recipes/ folder"):
        path_base(tmp_path / "spec.yaml", "project")
