"""The offline GPU kit (benchmarks/gpu_kit.sh): a dry run through every stage on CPU and its
ingest into the docs; and, where .ci/run has built the node's environment, the bundle proven
complete by installing the project from it without an index."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "benchmarks" / "gpu_kit.sh"
EXTRAS = "deepspeed,peft,tensorboard,trees,plots,evaluate"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "PYTHON": sys.executable, **extra}


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, (done.stdout or "")[-6000:] + (done.stderr or "")[-6000:]


def test_dry_run_goes_through_every_stage_and_ingest_writes_the_docs(tmp_path):
    """`run --dry-run` (no bundle: the environment as it is) installs the project into a scratch
    folder, checks the imports, measures the bare loop and the shared-GPU step rate, plans and runs
    the study (one pair, tiny model) with the experiment command, and packs one folder; `ingest`
    turns it into docs/gpu.md, docs/study/<name>/ and a section of results.md that a second
    ingest replaces."""
    out = tmp_path / "out"
    committed = {name: (REPO / "docs" / name).read_text() for name in ("gpu.md", "results.md")}
    done = subprocess.run(
        ["bash", str(KIT), "run", "--dry-run", "--out", str(out), "--budget", "900", "--check_stages", "bare,rate"],
        cwd=REPO, env=_env(GPU_KIT_DIR=str(tmp_path / "no_kit")), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    _ok(done)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["check.tar.gz", "gpu.md", "log.txt", "logs.tar.gz", "study.tar.gz", "summary.json"], (
        files
    )
    assert all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    summary = json.loads((out / "summary.json").read_text())
    statuses = {stage["name"]: stage["status"] for stage in summary["stages"]}
    assert statuses == {"install": "ok", "imports": "ok", "check": "ok", "study": "ok"}, statuses
    assert summary["dry_run"] and summary["study"]["pairs"] == 1 and summary["study"]["max_steps"] == 20
    # The rung follows the step rate the check measured (on CPU, a tiny model: it depends on the
    # machine's load), so any rung of the fixed ladder; the dry run then trains it for 20 steps.
    rung = re.fullmatch(r"recipes/experiments/lr_paper_gpu_(5|10|20|40|80)k\.yaml", summary["study"]["spec"])
    assert rung, summary["study"]["spec"]
    spec_name, study_dir = f"lr_paper_gpu_{rung.group(1)}k", f"lr_gpu_{rung.group(1)}k"
    check = (out / "gpu.md").read_text()
    assert check.startswith("DRY RUN on CPU") and "bare PyTorch loop" in check and "## Step rate" in check
    with tarfile.open(out / "study.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./plain/seed0.json", "./paper/seed0.json", f"./{spec_name}/results.md"} <= names, names
    log = (out / "log.txt").read_text()
    assert "gpu_kit: all" in log and "imports found" in log

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Results\n\nThe CPU study.\n")
    for _ in range(2):  # a second ingest replaces what the first wrote
        ingested = subprocess.run(
            ["bash", str(KIT), "ingest", str(out), "--docs", str(docs)],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        _ok(ingested)
    gpu = (docs / "gpu.md").read_text()
    assert gpu.startswith("DRY RUN on CPU") and "## The GPU-scale study" in gpu and "| study | ok |" in gpu
    record = json.loads((docs / "study" / study_dir / "paper" / "seed0.json").read_text())
    assert record["arm"] == "paper" and record["global_step"] == 20 and record["eval"]["seed"] == 20261130
    results = (docs / "results.md").read_text()
    assert results.startswith("# Results\n\nThe CPU study.\n")
    assert results.count("<!-- gpu_kit: begin") == 1 and results.count("<!-- gpu_kit: end -->") == 1
    assert "DRY RUN, not a result" in results and f"](study/{study_dir}/{spec_name}/curves.png)" in results
    assert all((REPO / "docs" / name).read_text() == text for name, text in committed.items())  # untouched


def _bundle() -> Path | None:
    kit = Path(os.environ.get("GPU_KIT_DIR", REPO / ".gpu_kit"))
    return kit if (kit / "MANIFEST.txt").is_file() else None


@pytest.mark.skipif(
    not os.environ.get("ICL_CONML_NODE_PYTHON") or _bundle() is None,
    reason="needs the node's environment and the bundle, which need network to build: .ci/run builds them "
    "(ICL_CONML_NODE_PYTHON, `bash benchmarks/gpu_kit.sh prepare`)",
)
def test_bundle_installs_the_project_offline_into_the_nodes_environment(tmp_path):
    """A venv that sees exactly the node's packages (benchmarks/gpu_node.txt, installed by .ci/run)
    installs the project with every extra a node run needs from the bundle alone (pip resolves
    every requirement, no index) and imports all it needs; without one of the bundle's wheels the
    same install fails."""
    node_python = os.environ["ICL_CONML_NODE_PYTHON"]
    bundle = _bundle()
    site = subprocess.run(
        [node_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip

    def venv(name: str) -> Path:
        path = tmp_path / name
        subprocess.run([node_python, "-m", "venv", str(path)], check=True, timeout=300)
        purelib = subprocess.run(
            [str(path / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        Path(purelib, "node.pth").write_text(site + "\n")  # the node's packages, read-only
        return path / "bin" / "python"

    def install(python: Path, links: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(python), "-m", "pip", "install", "--no-index", "--find-links", str(links),
             "--no-build-isolation", f"{REPO}[{EXTRAS}]"],
            capture_output=True, text=True, timeout=900, env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
        )  # fmt: skip

    python = venv("complete")
    _ok(install(python, bundle))
    imports = subprocess.run(
        [str(python), str(REPO / "benchmarks" / "gpu_kit.py"), "check", "--cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    _ok(imports)
    assert "all" in imports.stdout and "imports found" in imports.stdout

    partial = tmp_path / "partial"
    shutil.copytree(bundle, partial)
    for wheel in partial.glob("pydantic_core-*.whl"):
        wheel.unlink()
    failed = install(venv("partial"), partial)
    assert failed.returncode != 0 and "pydantic" in (failed.stdout + failed.stderr).lower()
