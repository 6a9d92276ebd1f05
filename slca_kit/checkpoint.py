"""Checkpoint folders: written under a temporary name and renamed when complete, so a crash mid-save leaves the
previous checkpoint as the latest one. ``progress.json`` inside says where the run stands."""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Callable

from .errors import CheckpointError
from .io import read_json, write_json_atomic

PROGRESS_FILE = "progress.json"
_NAME = re.compile(r"^task_(\d{3})(?:_epoch_(\d{3})(?:_step_(\d{6}))?)?$")
_LAST = 10**9  # sorts a finished epoch after its steps, and a finished task after its epochs


def checkpoint_name(task: int, epoch: int | None, step: int | None = None) -> str:
    """Task-end checkpoints are ``task_003``; epoch-end ones ``task_003_epoch_004`` (after epoch index 4);
    preemption ones ``task_003_epoch_004_step_000017`` (in epoch 4, after the optimizer step ending at micro-batch
    index 17)."""
    if epoch is None:
        return f"task_{task:03d}"
    return f"task_{task:03d}_epoch_{epoch:03d}" + ("" if step is None else f"_step_{step:06d}")


def _order_key(path: Path) -> tuple[int, int, int]:
    task, epoch, step = _NAME.match(path.name).groups()
    return int(task), _LAST if epoch is None else int(epoch), _LAST if step is None else int(step)


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints whose progress file was written (the last step of a save), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / PROGRESS_FILE).is_file()]
    return sorted(found, key=_order_key)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file in a checkpoint folder."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != PROGRESS_FILE}


def verify(checkpoint: Path) -> str | None:
    """None if every file listed in the progress file is there with its size and hash; else what is wrong."""
    try:
        expected = read_progress(checkpoint)["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"unreadable {PROGRESS_FILE}: {err}"
    for name, entry in expected.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {entry['bytes']} (truncated?)"
        if _sha256(path) != entry["sha256"]:
            return f"{name} does not match its recorded SHA-256 (corrupted)"
    return None


def latest_valid_checkpoint(root: Path, warn=print) -> Path | None:
    """The newest complete checkpoint whose files verify; damaged ones are reported and skipped."""
    for candidate in reversed(complete_checkpoints(root)):
        problem = verify(candidate)
        if problem is None:
            return candidate
        warn(f"checkpoint {candidate} is damaged ({problem}); trying the previous one")
    return None


def staging_dir(root: Path, name: str) -> Path:
    path = root / f".staging_{name}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def finalize(staging: Path, final: Path, progress: dict, keep: int) -> None:
    """Write the progress file (with a manifest of sizes and hashes), move the staging folder into place, then
    prune older checkpoints."""
    write_json_atomic(staging / PROGRESS_FILE, {**progress, "files": manifest(staging)})
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    older = complete_checkpoints(final.parent)[:-keep] if keep > 0 else []
    for path in older:
        shutil.rmtree(path, ignore_errors=True)


def read_progress(checkpoint: Path) -> dict:
    return read_json(checkpoint / PROGRESS_FILE)


def save_state(accelerator, root: Path, name: str, progress: dict, keep: int,
               extra_files: dict[str, Callable[[Path], None]] | None = None) -> None:
    """``accelerator.save_state`` (every process) into ``root/.staging_NAME``, then ``extra_files`` (file name ->
    writer, main process), ``progress.json`` and the rename to ``root/NAME``. An ``OSError`` (out of disk,
    permissions) removes the staging folder and is raised as a ``CheckpointError``: the previous checkpoint stays the
    latest complete one."""
    staging = root / f".staging_{name}"
    try:
        if accelerator.is_main_process:
            staging_dir(root, name)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for file_name, write in (extra_files or {}).items():
                write(staging / file_name)
            finalize(staging, root / name, progress, keep)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {name} under {root}: {err}; the previous checkpoint is "
                              f"intact: {latest_checkpoint(root) or 'none yet'}") from None
    accelerator.wait_for_everyone()
