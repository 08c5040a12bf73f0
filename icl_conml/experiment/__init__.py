"""Paired multi-seed studies: ``python -m icl_conml.experiment SPEC.yaml [--jobs N]``.

A spec names a base recipe, the arms (plain ICL and ConML variants as recipe-key overrides),
the seeds and the evaluation. Every arm of a seed trains from the same seed, hence the same
initial weights and training prompts: only the arm's keys differ (pairing). Each run is an
ordinary training run (``python -m icl_conml.train``, or any ``launcher`` such as
``accelerate launch -m icl_conml.train``) in its own process, evaluated during training on one
fixed prompt set shared by every run. When a run ends, a small JSON record (resolved recipe,
commit, version, attention kernel, training log, eval curves) is written under ``records_dir``;
a run with a record is never trained again, so re-running the command resumes a study (an
interrupted run resumes from its latest checkpoint). Specs may share a ``records_dir`` (an arm
with the same name and settings is then the same run, trained once). A spec with a larger
``max_steps`` that shares ``output_dir`` with a finished one continues its runs from their last
checkpoint (a longer study at the cost of the extra steps; records stay per spec). The analysis
reads only records, so it works on any machine that has them, and writes each spec's tables and
plots to ``records_dir/<spec name>/``. The spec format and the analysis: docs/experiments.md.

Modules: ``spec`` (reading and checking a spec, its runs), ``records`` (reading a record, is it
this spec's run), ``runner`` (training and recording runs), ``processes`` (claims on runs, stop
signals forwarded to the training processes), ``analysis`` (Table 5 over seeds, the report),
``aa`` (the A/A control), ``cli`` (the command line). The statistics are
``icl_conml.evaluation.statistics``.

    python -m icl_conml.experiment recipes/experiments/lr_paper_cpu.yaml --jobs 2
    python -m icl_conml.experiment SPEC --analyze_only          # tables and plots from records
    python -m icl_conml.experiment SPEC --slurm [--submit]      # a SLURM job array, one run per task
"""

from .analysis import analyze, load_records
from .cli import build_parser, main, slurm_script
from .records import ExperimentError, expected_settings, read_record
from .runner import build_record, execute, read_segments, run_all, usable_cpus
from .spec import EvalSpec, Run, Spec, load_spec

__all__ = [
    "EvalSpec",
    "ExperimentError",
    "Run",
    "Spec",
    "analyze",
    "build_parser",
    "build_record",
    "execute",
    "expected_settings",
    "load_records",
    "load_spec",
    "main",
    "read_record",
    "read_segments",
    "run_all",
    "slurm_script",
    "usable_cpus",
]
