"""Run infrastructure: everything about a run's folder (``output_dir``), none of the learning.

==================  ===============================================================================
module              owns
==================  ===============================================================================
``guard``           ``RunGuard``, the context manager around a run: lock + stop signals + record,
                    and an early stop as its one line and exit status
``lock``            one run per ``output_dir``: the flock, its owner record, heartbeat, stale locks
``preemption``      SIGTERM/SIGUSR1 → a checkpoint at the next step end, then ``RunInterrupted``
``signals``         signal handlers set for a while and put back (the base of ``preemption``'s and of
                    the experiment command's forwarding)
``record``          ``run_status.json`` and ``run_history.jsonl``: what the run does, what each
                    segment did
``checkpoints``     where a run stands on disk: intact checkpoints, manifests, what to resume from
``resume``          where a run starts: a fresh ``output_dir`` or a checked checkpoint, compared with
                    the run's recorded settings
``files``           writes inside a run folder that never follow a symbolic link
``storage``         a failed write to ``output_dir`` (disk full, quota, I/O error) as one line, exit 74
==================  ===============================================================================

A problem with the run folder itself (a busy or unwritable folder, a link where a run writes, an
earlier run in the way, a missing or damaged checkpoint) is a ``RunError``; a resume refused
because a recipe key disagrees with the run it continues stays a ``RecipeError`` (the fix is in
the recipe). Both are user errors: one line, exit status 2. This module defines only the error
(importing any submodule runs it), so every submodule can raise it without an import circle.
"""

from __future__ import annotations

from ..errors import UserError


class RunError(UserError, ValueError):
    """A user error about a run folder (busy, unwritable, holding a link, an earlier run, a missing
    or damaged checkpoint): one line naming the fix, exit status 2.

    Not a ``RecipeError``: the recipe is fine, the folder is not. A ``ValueError`` like
    ``RecipeError``, which these errors were before they had their own type.
    """
