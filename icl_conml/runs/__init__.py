"""Run infrastructure: everything about a run's folder (``output_dir``), none of the learning.

==================  ===============================================================================
module              owns
==================  ===============================================================================
``guard``           ``RunGuard``, the context manager around a run: lock + stop signals + record,
                    and an early stop as its one line and exit status
``lock``            one run per ``output_dir``: the flock, its owner record, heartbeat, stale locks
``preemption``      SIGTERM/SIGUSR1 → a checkpoint at the next step end, then ``RunInterrupted``
``record``          ``run_status.json`` and ``run_history.jsonl``: what the run does, what each
                    segment did
``checkpoints``     where a run stands on disk: intact checkpoints, manifests, what to resume from
``resume``          where a run starts: a fresh ``output_dir`` or a checked checkpoint, compared with
                    the run's recorded settings
``files``           writes inside a run folder that never follow a symbolic link
``storage``         a failed write to ``output_dir`` (disk full, quota, I/O error) as one line, exit 74
==================  ===============================================================================
"""
