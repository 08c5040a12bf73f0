"""The offline GPU kit's parts (``benchmarks/gpu_kit.sh`` runs them): the bundle, the checks, the study plan, ingest.

- ``bundle``: on a machine with network, the wheels a node without network lacks. It walks the
  project's requirements (core and the extras a run needs) and each downloaded wheel's
  ``Requires-Dist`` for CPython 3.12 on x86-64 Linux, skipping every package the node already
  has at a version inside the requirement (``benchmarks/gpu_node.txt``), and downloads the rest
  (``pip download --no-deps --only-binary :all:``; a package published only as an sdist, such as
  DeepSpeed, becomes a pure wheel with ``DS_BUILD_OPS=0 pip wheel``: its ops build just in time).
- ``check``: on the node, every import the run needs; one line per missing import.
- ``plan``: the study's rung (fixed ladder of step counts) and number of paired seeds from the
  step rate the check measured and the time left; writes the spec the node runs (the shipped
  spec with its seeds cut and its folders moved into scratch).
- ``ingest``: the node's output folder into ``docs/gpu.md``, ``docs/study/<name>/`` and a
  marked section of ``docs/results.md`` (re-ingesting replaces that section).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Extras a node run needs (wandb is not one: the node lacks it and nothing here uses it).
KIT_EXTRAS = ("deepspeed", "peft", "tensorboard", "trees", "plots", "evaluate")
#: CPython 3.12 on x86-64 Linux: the node's interpreter, for evaluating requirement markers.
NODE_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "platform_release": "",
    "platform_version": "",
}
PLATFORM_FLAGS = [
    "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
    "--platform", "manylinux2014_x86_64",
]  # fmt: skip
#: Every import a node run needs: (module, what needs it).
IMPORTS = [
    ("torch", "training"), ("transformers", "training"), ("accelerate", "training"),
    ("huggingface_hub", "model files"), ("safetensors", "model files"), ("numpy", "data"),
    ("yaml", "recipes"), ("tqdm", "progress"), ("jinja2", "model cards"), ("datasets", "eval sets"),
    ("dill", "datasets"), ("multiprocess", "datasets"), ("deepspeed", "the zero2 stage"),
    ("hjson", "deepspeed"), ("pydantic", "deepspeed"), ("evaluate", "the icl_curve metric"),
    ("peft", "LoRA"), ("matplotlib", "study plots"), ("icl_conml", "everything"),
    ("icl_conml.train", "training"), ("icl_conml.experiment", "the study"),
    ("icl_conml.experiment.analysis", "the study's analysis"), ("icl_conml.evaluation", "records"),
]  # fmt: skip
LADDER = (5000, 10000, 20000, 40000, 80000)
SPEC_PATTERN = "recipes/experiments/lr_paper_gpu_{k}k.yaml"
RESULTS_BEGIN = (
    "<!-- gpu_kit: begin (written by `bash benchmarks/gpu_kit.sh ingest`; re-ingesting replaces it) -->"
)
RESULTS_END = "<!-- gpu_kit: end -->"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_node(path: Path) -> dict[str, str]:
    """``name==version`` lines (``#`` comments): the distributions the node has installed."""
    node = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            node[_canonical(name)] = version.strip()
    return node


def project_requirements(pyproject: Path, extras: tuple[str, ...]) -> list[str]:
    data = tomllib.loads(pyproject.read_text())["project"]
    name = _canonical(data["name"])
    requirements = list(data["dependencies"])
    for extra in extras:
        requirements += data["optional-dependencies"][extra]
    return [r for r in requirements if not _canonical(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) == name]


def _wheel_metadata(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def _fetch(requirement: str, into: Path, constraints: Path | None) -> Path:
    """One wheel for the node (no dependencies); an sdist-only package is built as a pure wheel."""
    scratch = Path(tempfile.mkdtemp(dir=into.parent))
    extra = ["-c", str(constraints)] if constraints else []
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    download = [*pip, "download", "--no-deps", "--only-binary", ":all:", *PLATFORM_FLAGS, *extra]
    result = subprocess.run([*download, "-d", str(scratch), requirement], capture_output=True, text=True)
    if result.returncode != 0:
        # No wheel for the node: build one from the sdist, accepted only if it is pure Python.
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        build = [*pip, "wheel", "--no-deps", *extra, "-w", str(scratch), requirement]
        built = subprocess.run(build, capture_output=True, text=True, env=env)
        if built.returncode != 0:
            sys.exit(
                f"gpu_kit: error: no wheel for {requirement}: {(result.stderr or built.stderr).strip()[-400:]}"
            )
    wheels = list(scratch.glob("*.whl"))
    if len(wheels) != 1 or (result.returncode != 0 and not wheels[0].name.endswith("-none-any.whl")):
        sys.exit(f"gpu_kit: error: {requirement} gave {[w.name for w in wheels]}, not one pure wheel")
    target = into / wheels[0].name
    shutil.move(wheels[0], target)
    shutil.rmtree(scratch, ignore_errors=True)
    return target


def bundle(args: argparse.Namespace) -> None:
    """Download exactly the wheels the node lacks into ``args.out`` (see the module docstring)."""
    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename
    from packaging.version import Version

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metadata_cache = out.parent / (out.name + ".metadata")
    metadata_cache.mkdir(exist_ok=True)
    node = read_node(Path(args.node))
    constraints = Path(args.constraints) if args.constraints else None
    present = {}
    for wheel in out.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        present[_canonical(name)] = (str(version), wheel)
    chosen: dict[str, tuple[str, Path | None]] = {}  # name -> (version, wheel; None: the node's)
    done_extras: dict[str, set[str]] = {}
    edges: list[tuple[str, Requirement]] = []
    queue = [("icl_conml", Requirement(r)) for r in project_requirements(REPO / "pyproject.toml", KIT_EXTRAS)]
    while queue:
        parent, requirement = queue.pop(0)
        name = _canonical(requirement.name)
        edges.append((parent, requirement))
        if name not in chosen:
            node_version = node.get(name)
            if node_version is not None and requirement.specifier.contains(node_version, prereleases=True):
                chosen[name] = (node_version, None)
            else:
                if node_version is not None:
                    print(
                        f"gpu_kit: the node's {name}=={node_version} is outside {requirement} ({parent}): bundled"
                    )
                wheel = None
                if name in present and requirement.specifier.contains(present[name][0], prereleases=True):
                    wheel = present[name][1]
                else:
                    wheel = _fetch(f"{requirement.name}{requirement.specifier}", out, constraints)
                    print(f"gpu_kit: + {wheel.name} (for {parent})")
                chosen[name] = (str(parse_wheel_filename(wheel.name)[1]), wheel)
        version, wheel = chosen[name]
        wanted = {""} | set(requirement.extras)
        new = wanted - done_extras.setdefault(name, set())
        if not new or (wheel is None and new == {""}):
            continue  # the node's own dependencies are installed with it
        if wheel is None:  # extras of a node package: their requirements may be missing
            cached = [
                w for w in metadata_cache.glob("*.whl") if _canonical(parse_wheel_filename(w.name)[0]) == name
            ]
            wheel_for_metadata = (
                cached[0] if cached else _fetch(f"{requirement.name}=={version}", metadata_cache, None)
            )
            new -= {""}
        else:
            wheel_for_metadata = wheel
        done_extras[name] |= new
        for line in _wheel_metadata(wheel_for_metadata):
            dependency = Requirement(line)
            if dependency.marker is None and "" not in new:
                continue
            if dependency.marker is None or any(
                dependency.marker.evaluate({**NODE_MARKERS, "extra": extra}) for extra in new
            ):
                queue.append((name, dependency))
    conflicts = [
        f"{parent} needs {req} but gets {_canonical(req.name)}=={chosen[_canonical(req.name)][0]}"
        for parent, req in edges
        if not req.specifier.contains(Version(chosen[_canonical(req.name)][0]), prereleases=True)
    ]
    kept = {wheel.resolve() for _, wheel in chosen.values() if wheel is not None}
    for stale in out.glob("*.whl"):
        if stale.resolve() not in kept:
            print(f"gpu_kit: - {stale.name} (no longer needed)")
            stale.unlink()
    shutil.rmtree(metadata_cache, ignore_errors=True)
    if conflicts:
        sys.exit("gpu_kit: error: " + "; ".join(conflicts))
    lines = [f"{name}=={version}" for name, (version, wheel) in sorted(chosen.items()) if wheel is not None]
    (out / "MANIFEST.txt").write_text(
        "# The wheels this bundle adds to the node (benchmarks/gpu_node.txt): `bash benchmarks/gpu_kit.sh prepare`\n"
        + "\n".join(lines)
        + "\n"
    )
    print(f"gpu_kit: {len(lines)} wheels: " + ", ".join(lines))


def check(args: argparse.Namespace) -> None:
    """Import everything a node run needs; one line per missing import, exit 1 if any."""
    import importlib

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.cpu else "cuda")
    missing = 0
    for module, why in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 (any import failure is what this reports)
            missing += 1
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            print(f"gpu_kit: missing import {module} (needed for {why}): {type(error).__name__}: {first}")
    if missing:
        sys.exit(1)
    print(f"gpu_kit: all {len(IMPORTS)} imports found")


def plan(args: argparse.Namespace) -> None:
    """Pick the rung and the number of paired seeds; write the spec the node runs (JSON plan on stdout)."""
    import yaml

    rate = json.loads(Path(args.rate).read_text()) if args.rate and Path(args.rate).is_file() else None
    ladder = [int(k) for k in args.ladder.split(",")]
    pairs_per_wave = max(1, args.jobs // 2)
    seconds = float(args.seconds)
    why = []
    if rate and rate.get("slowest_steps_per_s"):
        steps_per_s = rate["slowest_steps_per_s"]
        startup = rate.get("startup_s", 30.0) + args.record_seconds
        fits = [steps for steps in ladder if startup + steps / steps_per_s <= seconds]
        steps = max(fits) if fits else min(ladder)
        wave = startup + steps / steps_per_s
        waves = max(1, math.floor(seconds / wave)) if fits else 1
        why.append(
            f"{rate['processes']} processes sharing the GPU trained at {steps_per_s:.1f} steps/s each (the "
            f"slowest, ConML), {startup:.0f} s start-up and record per run: a wave of {pairs_per_wave} pairs "
            f"at {steps} steps takes about {wave:.0f} s of the {seconds:.0f} s left"
        )
        if not fits:
            why.append("no rung fits: the smallest runs and may be cut by the time limit")
    else:
        steps, waves = min(ladder), 1
        why.append("no step rate was measured: the smallest rung, one wave")
    spec_path = REPO / SPEC_PATTERN.format(k=steps // 1000)
    spec = yaml.safe_load(spec_path.read_text())
    n_pairs = min(len(spec["seeds"]), pairs_per_wave * waves)
    if args.max_pairs:
        n_pairs = min(n_pairs, args.max_pairs)
    spec["seeds"] = spec["seeds"][:n_pairs]
    name = spec["name"]
    spec["base_recipe"] = str(REPO / spec["base_recipe"])
    spec["output_dir"] = str(Path(args.work) / "runs" / name)
    spec["records_dir"] = str(Path(args.work) / "records" / Path(spec["records_dir"]).name)
    if args.tiny:  # dry run: the same study, a tiny model, a few steps
        spec["overrides"] = {**spec.get("overrides", {}), **yaml.safe_load(args.tiny)}
        steps = int(spec["overrides"]["max_steps"])
        spec["eval"]["every"] = int(spec["overrides"]["max_steps"])
        spec["eval"]["n_prompts"] = 64
        spec["eval"]["bootstrap_samples"] = 50
    out = Path(args.work) / f"{name}.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = {
        "spec": str(spec_path.relative_to(REPO)),
        "node_spec": str(out),
        "name": name,
        "max_steps": steps,
        "pairs": n_pairs,
        "jobs": args.jobs,
        "records_dir": spec["records_dir"],
        "why": "; ".join(why),
    }
    print(json.dumps(result))


# ---- ingest --------------------------------------------------------------------------------------
def _safe_extract(archive: Path, into: Path) -> None:
    """Extract regular files and folders only: no links, no absolute paths, nothing outside ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    root = into.resolve()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            target = (into / member.name).resolve()
            if not (member.isfile() or member.isdir()) or root not in (target, *target.parents):
                raise SystemExit(
                    f"gpu_kit: error: {archive} holds {member.name!r}, not a plain file inside it"
                )
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if target.is_symlink():
                raise SystemExit(f"gpu_kit: error: refusing to write through the link {target}")
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())


def ingest(args: argparse.Namespace) -> None:
    """The node's output folder into docs/gpu.md, docs/study/<name>/ and docs/results.md's section."""
    folder = Path(args.folder)
    summary_file = folder / "summary.json"
    if not summary_file.is_file():
        sys.exit(f"gpu_kit: error: {folder} holds no summary.json; pass the folder `gpu_kit.sh run` wrote")
    summary = json.loads(summary_file.read_text())
    docs = Path(args.docs)
    dry = summary.get("dry_run", False)
    lines = []
    report = folder / "gpu.md"
    check_text = report.read_text() if report.is_file() else "# GPU check\n\nThe check wrote no report.\n"
    if dry and not check_text.startswith("DRY RUN"):
        check_text = (
            "DRY RUN on CPU: a tiny model for a few steps, to check the kit end to end.\n\n" + check_text
        )
    lines.append(check_text.rstrip())
    study = summary.get("study") or {}
    results_section = []
    study_md = None
    if study.get("name") and (folder / "study.tar.gz").is_file():
        target = docs / "study" / Path(study["records_dir"]).name
        if target.exists():
            shutil.rmtree(target)
        _safe_extract(folder / "study.tar.gz", target)
        study_md = target / study["name"] / "results.md"
    lines += ["", "## The GPU-scale study", ""]
    if study.get("name"):
        lines += [
            f"`{study['spec']}`: {study['pairs']} paired seed(s), {study['max_steps']} steps, "
            f"{study['jobs']} runs at a time on the one GPU (`python -m icl_conml.experiment SPEC --jobs "
            f"{study['jobs']}`). Chosen because {study['why']}. Stage status: {study.get('status', '?')}.",
            "",
        ]
        if study_md is not None and study_md.is_file():
            rel = study_md.parent.relative_to(docs)
            lines += [
                f"Records: `docs/{rel.parent}/`; analysis: [`docs/{rel}/results.md`]({rel}/results.md)."
            ]
            body = study_md.read_text().replace("](", f"]({rel}/")
            body = re.sub(r"^# ", "### ", body, flags=re.M)
            results_section = [
                "## At GPU scale: Garg et al.'s standard model ("
                + ("DRY RUN, not a result" if dry else "H100/H200")
                + ")",
                "",
                f"Written by `bash benchmarks/gpu_kit.sh ingest` from a `gpu_kit.sh run` on {summary.get('device', '?')} "
                f"({summary.get('finished', '?')}); {study['pairs']} paired seed(s), {study['max_steps']} steps, "
                f"spec `{study['spec']}`; the node's record: [docs/gpu.md](gpu.md).",
                "",
                body.strip(),
            ]
        else:
            lines.append("The study wrote no analysis (see the stage status and log).")
    else:
        lines.append("Not run (see the stage status).")
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} |" for s in summary.get("stages", [])]
    versions = summary.get("versions", {})
    if versions:
        lines += [
            "",
            "Versions on the node: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".",
        ]
    lines += [
        "",
        "Made with `bash benchmarks/gpu_kit.sh run --budget "
        f"{summary.get('budget_s', '?')}` on the node ({summary.get('seconds', '?')} s, commit "
        f"{(summary.get('commit') or 'unknown')[:10]}) and `bash benchmarks/gpu_kit.sh ingest DIR`; how: "
        "[distributed.md, air-gapped cluster](distributed.md#air-gapped-cluster).",
    ]
    (docs / "gpu.md").write_text("\n".join(lines) + "\n")
    results = docs / "results.md"
    text = results.read_text() if results.is_file() else ""
    section = "\n".join([RESULTS_BEGIN, *results_section, RESULTS_END]) if results_section else ""
    if RESULTS_BEGIN in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_BEGIN, 1)
        tail = rest.split(RESULTS_END, 1)[1]
        text = head + section + tail if section else head.rstrip("\n") + "\n" + tail.lstrip("\n")
    elif section:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    results.write_text(text)
    print(
        f"gpu_kit: wrote {docs / 'gpu.md'}"
        + (f", {study_md.parent.parent} and {results}" if study_md else "")
    )


def summary(args: argparse.Namespace) -> None:
    """summary.json: stage statuses, the study's plan, versions and the node's installed packages."""
    import importlib.metadata as metadata
    import platform
    from datetime import UTC, datetime

    work = Path(args.work)
    stages_file = work / "stages.jsonl"
    stages = (
        [json.loads(line) for line in stages_file.read_text().splitlines()] if stages_file.is_file() else []
    )
    study = json.loads((work / "plan.json").read_text()) if (work / "plan.json").is_file() else {}
    if study:
        study["status"] = next((s["status"] for s in stages if s["name"] == "study"), "?")
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "huggingface_hub", "safetensors", "numpy",
                 "datasets", "deepspeed", "peft", "evaluate", "icl_conml"):  # fmt: skip
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    device = "CPU"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    packages = sorted(
        {f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]}
    )
    result = {
        "dry_run": args.dry_run,
        "device": device,
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "budget_s": args.budget,
        "seconds": args.seconds,
        "commit": commit,
        "stages": stages,
        "study": study,
        "versions": versions,
        "installed": packages,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("bundle", help="Download the wheels the node lacks.")
    p.add_argument("--out", required=True)
    p.add_argument("--node", default=str(REPO / "benchmarks" / "gpu_node.txt"))
    p.add_argument("--constraints", default=str(REPO / "benchmarks" / "gpu_kit_constraints.txt"))
    p = commands.add_parser("check", help="Every import a node run needs.")
    p.add_argument("--cpu", action="store_true")
    p = commands.add_parser("plan", help="The study's rung and seeds from the measured step rate.")
    p.add_argument("--rate", help="rate.json of the check (absent: the smallest rung)")
    p.add_argument("--seconds", type=float, required=True, help="Seconds the study may take.")
    p.add_argument("--jobs", type=int, default=8, help="Runs at a time on the GPU (2 per pair).")
    p.add_argument("--ladder", default=",".join(map(str, LADDER)))
    p.add_argument("--record_seconds", type=float, default=20.0, help="Per run: final evaluation and record.")
    p.add_argument("--max_pairs", type=int, default=0)
    p.add_argument("--tiny", default="", help="YAML mapping of overrides (dry run)")
    p.add_argument("--work", required=True)
    p = commands.add_parser("summary", help="summary.json of a run (internal).")
    p.add_argument("--work", required=True)
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--seconds", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dry_run", action="store_true")
    p = commands.add_parser("ingest", help="The node's output folder into the docs.")
    p.add_argument("folder")
    p.add_argument("--docs", default=str(REPO / "docs"))
    args = parser.parse_args(argv)
    {"bundle": bundle, "check": check, "plan": plan, "summary": summary, "ingest": ingest}[args.command](args)


if __name__ == "__main__":
    main()
