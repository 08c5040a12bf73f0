"""Where a run stands on disk: intact checkpoints, finished runs, what to resume from.

A checkpoint directory is written file by file (weights, optimizer, scheduler, RNG state,
then ``trainer_state.json``), and ``CheckpointManifest`` (an ``on_save`` callback) then writes
``manifest.json`` last: the size and sha256 of every file. ``check_checkpoint`` verifies a
checkpoint against its manifest (a truncated, bit-flipped, replaced or missing file fails),
or, for a checkpoint without one (written before manifests existed, or a save cut between
``trainer_state.json`` and the manifest), checks its structure: a readable trainer state for
its own step, complete weight files, readable optimizer and scheduler archives.
Every checkpoint's optimizer, scheduler and RNG files must also load as plain tensors
(``torch.load(weights_only=True)``: a pickle payload is a damaged file, named, never run).
``latest_checkpoint`` returns the newest *verified* checkpoint (one whose manifest matches),
and only if there is none the newest unverified one (no manifest: its files cannot be compared
with what was saved), with a warning naming why each newer one was skipped, so a damaged or
half-written checkpoint never blocks a resume. Only folders named exactly ``checkpoint-<int>``
count (``checkpoint-40_backup`` or a file named ``checkpoint-40`` are not checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .files import write_text

logger = logging.getLogger("icl_conml")

TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")
# Words that mean "the newest intact checkpoint in output_dir" for --resume_from_checkpoint.
LATEST = ("latest", "last", "true", "True", "yes")
NO_RESUME = ("", "false", "False", "no", "none", "None")
# "latest" if output_dir holds a checkpoint, else a new run (what a requeued job asks for).
AUTO = ("auto",)
_CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


def _trainer_state(checkpoint: str | Path) -> dict[str, Any] | None:
    try:
        state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("global_step"), int) else None


def is_complete(checkpoint: str | Path) -> bool:
    """``trainer_state.json`` is readable and names a step (its structure only: see ``check_checkpoint``)."""
    return _trainer_state(checkpoint) is not None


def checkpoint_step(checkpoint: str | Path) -> int | None:
    """The step a checkpoint's ``trainer_state.json`` records (``None`` if it cannot be read)."""
    state = _trainer_state(checkpoint)
    return None if state is None else state["global_step"]


def _sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-<int>`` folders in ``output_dir`` (not links, not files), newest step first."""
    root = Path(output_dir)
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    found = [
        (int(match.group(1)), Path(entry.path))
        for entry in entries
        if (match := _CHECKPOINT_NAME.fullmatch(entry.name)) and entry.is_dir(follow_symlinks=False)
    ]
    return [path for _, path in sorted(found, key=lambda item: item[0], reverse=True)]


def _files(checkpoint: Path) -> list[Path]:
    return sorted(
        p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    )


def write_manifest(checkpoint: str | Path) -> Path:
    """Record the size and sha256 of every file of a saved checkpoint in ``manifest.json`` (atomically)."""
    checkpoint = Path(checkpoint)
    files = {
        str(p.relative_to(checkpoint)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(checkpoint)
    }
    target = checkpoint / MANIFEST
    manifest = {"format": 2, "files": files, "manifest_sha256": _manifest_digest(files)}
    write_text(target, json.dumps(manifest, indent=1), sync=True)
    return target


def _manifest_digest(files: Any) -> str:
    """The sha256 of the manifest's own file list: a damaged manifest is named as such."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _is_training_state(name: str) -> bool:
    """Optimizer, schedule, scaler and RNG files: not read by a weights-only resume."""
    return (
        name in ("optimizer.pt", "scheduler.pt", "scaler.pt")
        or re.fullmatch(r"rng_state(_\d+)?\.pth", name) is not None
    )


def _check_manifest(checkpoint: Path, *, need_training_state: bool = True) -> str | None:
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and files
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{MANIFEST} is unreadable (corrupted)"
    if "manifest_sha256" in manifest and manifest["manifest_sha256"] != _manifest_digest(files):
        return f"{MANIFEST} itself is corrupted (its own checksum does not match; the other files were not compared)"
    for name, expected in files.items():
        if not isinstance(expected, dict):
            return f"{MANIFEST} is unreadable (corrupted)"
        if not need_training_state and _is_training_state(name):
            continue
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing (listed in its {MANIFEST})"
        size = path.stat().st_size
        if size != expected.get("size"):
            return f"{name} is {size} bytes but {expected.get('size')} were saved (truncated or rewritten)"
        if _sha256(path) != expected.get("sha256"):
            return f"{name} does not match the sha256 recorded when it was saved (corrupted or replaced)"
    return None


def _check_safetensors(path: Path) -> str | None:
    """The header parses and the data is as long as the header says (catches truncation)."""
    try:
        with open(path, "rb") as stream:
            length = int.from_bytes(stream.read(8), "little")
            if length <= 0 or length > 100_000_000:
                return f"{path.name} has no valid safetensors header"
            header = json.loads(stream.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return f"{path.name} has no valid safetensors header (truncated or corrupted)"
    if path.stat().st_size != 8 + length + end:
        return f"{path.name} is {path.stat().st_size} bytes but its header describes {8 + length + end} (truncated)"
    return None


def _check_structure(checkpoint: Path, *, need_training_state: bool = True) -> str | None:
    """A checkpoint without a manifest: complete weights and readable optimizer/scheduler archives."""
    weights = [checkpoint / name for name in WEIGHT_FILES if (checkpoint / name).is_file()]
    deepspeed = list(checkpoint.glob("global_step*"))
    if not weights and not deepspeed:
        return "holds no model weights (model.safetensors)"
    for path in weights:
        if path.suffix == ".safetensors" and (problem := _check_safetensors(path)):
            return problem
    for path in _training_state_files(checkpoint) if need_training_state else ():
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError):
            return f"{path.name} is not a readable torch archive (truncated or corrupted)"
        if bad is not None:
            return f"{path.name} is corrupted (entry {bad} fails its CRC)"
    return None


def _training_state_files(checkpoint: Path) -> list[Path]:
    return sorted(p for p in checkpoint.iterdir() if p.is_file() and _is_training_state(p.name))


def _check_loads(checkpoint: Path) -> str | None:
    """Each optimizer/scheduler/RNG file loads as plain tensors (``weights_only``, as the Trainer
    loads it): a pickle payload or a damaged archive is named here, not as a traceback mid-resume."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    for path in _training_state_files(checkpoint):
        try:
            with safe_globals():  # the numpy types of the RNG state, as the Trainer allows them
                torch.load(path, map_location="cpu", weights_only=True, mmap=path.name == "optimizer.pt")
        except Exception as error:  # noqa: BLE001 - every failure to load is a damaged file
            if isinstance(error, pickle.UnpicklingError):
                return (
                    f"{path.name} holds more than tensors (torch.load with weights_only refuses it: a pickle "
                    f"payload or a damaged file); it was not loaded"
                )
            first = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
            return f"{path.name} cannot be loaded ({type(error).__name__}: {first})"
    return None


def missing_training_state(checkpoint: str | Path) -> list[str]:
    """Which of the optimizer and scheduler states a checkpoint lacks (DeepSpeed keeps both in global_step*/)."""
    checkpoint = Path(checkpoint)
    if list(checkpoint.glob("global_step*")):
        return []
    return [name for name in ("optimizer.pt", "scheduler.pt") if not (checkpoint / name).is_file()]


def check_checkpoint(checkpoint: str | Path, *, need_training_state: bool = True) -> str | None:
    """``None`` if the checkpoint is intact and resumable, else why not (a phrase for a message)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return "is not a directory"
    if not (checkpoint / TRAINER_STATE).is_file():
        return f"holds no {TRAINER_STATE} (the save was cut short)"
    state = _trainer_state(checkpoint)
    if state is None:
        return f"{TRAINER_STATE} is unreadable or names no global_step (cut short or corrupted)"
    named = _CHECKPOINT_NAME.fullmatch(checkpoint.name)
    if named and int(named.group(1)) != state["global_step"]:
        return f"{TRAINER_STATE} says step {state['global_step']} but the folder is {checkpoint.name} (stale)"
    if need_training_state and (missing := missing_training_state(checkpoint)):
        return f"holds no {' or '.join(missing)} (optimizer/schedule state)"
    check = _check_manifest if (checkpoint / MANIFEST).exists() else _check_structure
    problem = check(checkpoint, need_training_state=need_training_state)
    if problem is None and need_training_state:
        problem = _check_loads(checkpoint)
    return problem


def checkpoints_newest_first(output_dir: str | Path) -> list[str]:
    """The ``checkpoint-<int>`` folders of ``output_dir``, newest step first (as strings)."""
    return [str(path) for path in checkpoint_folders(output_dir)]


def latest_checkpoint(
    output_dir: str | Path, *, verify: bool = True, need_training_state: bool = True
) -> str | None:
    """The newest intact ``checkpoint-N`` in ``output_dir`` (``None`` if there is none).

    Verified checkpoints (a manifest that matches) come first; the newest unverified one (no
    manifest: written before manifests existed, or cut between its last file and the manifest)
    is taken only when no verified one is intact, with a warning saying it is unverified. Each
    checkpoint passed over is named in a warning with the reason. ``verify=False`` checks only
    that ``trainer_state.json`` is readable (no hashing).
    """
    unverified: list[str] = []
    for checkpoint in checkpoints_newest_first(output_dir):
        if not verify:
            if is_complete(checkpoint):
                return checkpoint
            continue
        problem = check_checkpoint(checkpoint, need_training_state=need_training_state)
        if problem is not None:
            logger.warning("skipping %s: it %s", checkpoint, problem if problem.startswith(("is ", "holds ")) else
                           f"fails its check: {problem}")  # fmt: skip
        elif (Path(checkpoint) / MANIFEST).is_file():  # verified: check_checkpoint compared every file
            for newer in unverified:
                logger.warning(
                    "skipping %s: it has no %s (unverified: its files cannot be compared with what was saved); "
                    "taking the newest verified checkpoint, %s",
                    newer,
                    MANIFEST,
                    checkpoint,
                )
            return checkpoint
        else:
            unverified.append(checkpoint)
    if unverified:
        logger.warning(
            "%s is unverified: it has no %s (written before manifests existed, or the save was cut before "
            "its manifest), so a damaged or replaced file cannot be detected; resuming from it as no verified "
            "checkpoint is intact",
            unverified[0],
            MANIFEST,
        )
        return unverified[0]
    return None


def damaged_checkpoints(output_dir: str | Path, *, need_training_state: bool = True) -> list[str]:
    """``checkpoint-N: why`` for every checkpoint that fails its check (for an error message)."""
    found = []
    for checkpoint in checkpoints_newest_first(output_dir):
        if problem := check_checkpoint(checkpoint, need_training_state=need_training_state):
            found.append(f"{Path(checkpoint).name}: {problem}")
    return found


class CheckpointManifest(TrainerCallback):
    """Write ``manifest.json`` into each checkpoint once every process has saved its files.

    ``on_save`` runs right after ``Trainer._save_checkpoint`` (weights, optimizer, scheduler,
    RNG states, trainer state, rotation of old checkpoints). A manifest left over from an
    earlier save of the same step (a resumed run saving ``checkpoint-N`` again) is removed at
    the step's end, before any file is rewritten, so it can never vouch for new files.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and args.should_save:
            stale = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / MANIFEST
            stale.unlink(missing_ok=True)
        return control

    def on_save(self, args, state, control, **kwargs):
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process has written its share (RNG states, shards)
        if args.should_save:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if checkpoint.is_dir():
                write_manifest(checkpoint)
        return control


def previous_run(output_dir: str | Path) -> list[str]:
    """What in ``output_dir`` belongs to an earlier run (checkpoints, a saved final model)."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    found = sorted((p.name for p in checkpoint_folders(path)), key=lambda name: int(name.rsplit("-", 1)[1]))
    found += [
        name
        for name in (TRAINER_STATE, "model.safetensors", "adapter_model.safetensors")
        if (path / name).exists()
    ]
    return found


def incomplete_checkpoints(output_dir: str | Path) -> list[str] | None:
    """If every ``checkpoint-N`` of ``output_dir`` was cut short before its ``trainer_state.json``
    (a kill during the first saves) and no final model was saved: ``checkpoint-N: why`` for each;
    else ``None`` (the folder holds something to resume, or damage a human should look at)."""
    folders = checkpoint_folders(output_dir)
    if not folders or any(is_complete(folder) for folder in folders):
        return None
    if set(previous_run(output_dir)) - {folder.name for folder in folders}:
        return None  # a final model or trainer_state.json: a finished run, not an unstarted one
    return [f"{folder.name}: {check_checkpoint(folder)}" for folder in folders]


#: The files a finished run leaves in output_dir (the Trainer's final save and the run's own).
FINAL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    "config.json",
    "generation_config.json",
    TRAINER_STATE,
    "training_args.bin",
    "README.md",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
)


def remove_final_files(output_dir: str | Path) -> list[str]:
    """Delete an earlier run's final model and state (on --overwrite_output_dir, before training):
    a new run cut short must never leave the old model beside its own recipe."""
    path = Path(output_dir)
    names = [*FINAL_FILES, *(p.name for p in path.glob("model-*-of-*.safetensors"))]
    removed = []
    for name in names:
        target = path / name
        if target.is_file() or target.is_symlink():
            target.unlink()  # a link itself, never its target
            removed.append(name)
    return removed


def remove_checkpoints(output_dir: str | Path, names: list[str] | None = None) -> list[str]:
    """Delete the ``checkpoint-N`` directories of an earlier run (on --overwrite_output_dir), or
    only those in ``names``."""
    import shutil

    removed = []
    for checkpoint in checkpoint_folders(output_dir):
        if names is None or checkpoint.name in names:
            shutil.rmtree(checkpoint)
            removed.append(checkpoint.name)
    return sorted(removed)
