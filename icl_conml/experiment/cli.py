"""The command line of ``python -m icl_conml.experiment`` (``icl_conml experiment``)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from ..errors import EXIT_INTERRUPTED, OneLineParser, command_name, entry_point
from .analysis import analyze, load_records
from .processes import Children
from .records import ExperimentError, expected_settings
from .runner import Outcome, run_all
from .spec import Spec, load_spec


def slurm_script(spec: Spec, spec_path: str) -> str:
    """A job array with one training run per task; each task skips a run that has a record.
    The tasks get the resolved records and run folders (the command line's overrides included)."""
    count = len(spec.runs())
    folders = f"--records_dir {shlex.quote(str(spec.records))} --output_dir {shlex.quote(str(spec.out))}"
    extra = "".join(f"#SBATCH --{key}={value}\n" for key, value in spec.slurm.items())
    logs = spec.out / "slurm"
    return (
        "#!/bin/bash\n"
        f"#SBATCH --job-name={spec.name}\n"
        f"#SBATCH --array=0-{count - 1}\n"
        f"#SBATCH --output={logs}/%A_%a.out\n"
        f"{extra}"
        "set -euo pipefail\n"
        f"cd {shlex.quote(str(Path.cwd()))}\n"
        f"python -m icl_conml.experiment {shlex.quote(spec_path)} {folders} "
        '--run_index "$SLURM_ARRAY_TASK_ID" --no_analysis\n'
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=command_name("python -m icl_conml.experiment", "icl_conml experiment"),
        description="Run and analyse a paired multi-seed study (plain ICL vs ConML arms).",
    )
    parser.add_argument(
        "spec",
        help="experiment spec YAML, or a packaged spec's name (lr_paper_cpu); format: docs/experiments.md",
    )
    parser.add_argument(
        "--records_dir",
        default=None,
        help="write and read records (and the analysis) here instead of the spec's records_dir: retrain a "
        "study from scratch (run folders go to DIR/runs unless --output_dir)",
    )
    parser.add_argument(
        "--output_dir", default=None, help="put the run folders here instead of the spec's output_dir"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time on this machine (threads split)")
    parser.add_argument(
        "--analyze_only", action="store_true", help="only build tables and plots from records"
    )
    parser.add_argument("--no_analysis", action="store_true", help="train only")
    parser.add_argument("--run_index", type=int, default=None, help="run only this run (SLURM array task)")
    parser.add_argument("--slurm", action="store_true", help="write a SLURM job array script and exit")
    parser.add_argument("--submit", action="store_true", help="with --slurm: submit it with sbatch")
    parser.add_argument("--dry_run", action="store_true", help="print each run's command and exit")
    return parser


@entry_point
def main(argv: list[str]) -> int:
    """``python -m icl_conml.experiment SPEC`` (``icl_conml experiment``); exit 1 if a run failed."""
    args = build_parser().parse_args(argv)
    spec = load_spec(args.spec, records_dir=args.records_dir, output_dir=args.output_dir)
    if args.jobs < 1:
        raise ExperimentError(f"--jobs {args.jobs} must be >= 1")
    if args.run_index is not None and not 0 <= args.run_index < len(spec.runs()):
        raise ExperimentError(f"--run_index {args.run_index} is outside 0..{len(spec.runs()) - 1}")
    expected = expected_settings(spec)  # every arm is a valid recipe, before anything trains
    if args.dry_run:
        done = load_records(spec, expected)
        for run in spec.runs():
            state = "done" if (run.arm, run.seed) in done else "todo"
            print(f"{state} {run.name}: {shlex.join(run.command())}")
        return 0
    if args.slurm:
        path = spec.out / "slurm" / f"{spec.name}.sbatch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(slurm_script(spec, args.spec))
        print(f"wrote {path} ({len(spec.runs())} array tasks)")
        if args.submit:
            return subprocess.run(["sbatch", str(path)]).returncode
        return 0
    outcome = Outcome()
    if not args.analyze_only:
        children = Children()
        children.install()  # stop signals reach the training runs, which checkpoint and stop
        try:
            outcome = run_all(spec, args.jobs, args.run_index, expected, children)
        finally:
            children.restore()
        if children.signal is not None:
            print(
                f"icl_conml: interrupted: {len(outcome.interrupted)} run(s) stopped, {len(outcome.not_started)} "
                f"not started; re-run the command to resume them from their checkpoints",
                file=sys.stderr,
            )
            return children.exit_code
    if not args.no_analysis and args.run_index is None:
        report = analyze(spec, expected=expected)
        print(f"[experiment] analysis written to {report}")
    if outcome.failures:
        failures = outcome.failures
        print(f"icl_conml: error: {len(failures)} run(s) failed: {'; '.join(failures)}", file=sys.stderr)
        return 1
    if outcome.interrupted:  # a training run was stopped from outside (a signal to it alone)
        print(
            f"icl_conml: interrupted: {', '.join(outcome.interrupted)} stopped; re-run the command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return 0
