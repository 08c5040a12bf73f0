"""Where a run stands on disk: complete checkpoints, finished runs, what to resume from.

A checkpoint directory is written file by file (weights, optimizer, scheduler, RNG state,
then ``trainer_state.json`` last), so a job killed while saving leaves a directory without
``trainer_state.json``. ``latest_checkpoint`` starts from ``get_last_checkpoint`` and falls
back to the newest *complete* checkpoint, so such a kill never blocks a resume.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, sort_checkpoints

logger = logging.getLogger("icl_conml")

TRAINER_STATE = "trainer_state.json"
# Words that mean "the newest complete checkpoint in output_dir" for --resume_from_checkpoint.
LATEST = ("latest", "last", "true", "True", "yes")
NO_RESUME = ("", "false", "False", "no", "none", "None")


def is_complete(checkpoint: str | Path) -> bool:
    """``trainer_state.json`` is written last: present and readable means the checkpoint is whole."""
    try:
        json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir``, or ``None``."""
    if not Path(output_dir).is_dir():
        return None
    last = get_last_checkpoint(str(output_dir))
    if last is None or is_complete(last):
        return last
    logger.warning("%s is incomplete (the job was stopped while saving it); skipping it", last)
    complete = [path for path in sort_checkpoints(str(output_dir)) if is_complete(path)]
    return complete[-1] if complete else None


def previous_run(output_dir: str | Path) -> list[str]:
    """What in ``output_dir`` belongs to an earlier run (checkpoints, a saved final model)."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    found = sorted(p.name for p in path.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir())
    found += [
        name
        for name in (TRAINER_STATE, "model.safetensors", "adapter_model.safetensors")
        if (path / name).exists()
    ]
    return found


def remove_checkpoints(output_dir: str | Path) -> list[str]:
    """Delete the ``checkpoint-N`` directories of an earlier run (on --overwrite_output_dir)."""
    import shutil

    removed = []
    for checkpoint in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        if checkpoint.is_dir():
            shutil.rmtree(checkpoint)
            removed.append(checkpoint.name)
    return sorted(removed)
