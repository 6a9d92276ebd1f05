"""Guards on a run folder: one writing process at a time, and ``--resume`` only with the configuration that
started the run unless the user accepts (and results.json records) the change (docs/reliability.md)."""
from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, RunFolderBusy
from .io import read_json, write_json_atomic

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
CHANGES_FILE = "config_changes.json"
# Keys that cannot change a result: where outputs go, how data is read, logging, how many checkpoints are kept.
RESULT_NEUTRAL_KEYS = ("name", "output_dir", "data.num_workers", "train.log_with", "train.keep_checkpoints",
                       "train.checkpoint_every_epoch")


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock``. The kernel drops it when its process ends, however it ends, so a
    lock file left by a killed process is not held and is taken over; a live holder is named by the id it wrote."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._handle = None
        self.previous_holder = ""  # what a stale lock file said, if one was taken over

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderBusy(f"{self.path.parent} is being written by {holder}; wait for that run to end or "
                                "stop it, or choose another name / output_dir") from None
        handle.seek(0)
        self.previous_holder = handle.read().strip()
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} (since {started})\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Empty the file and drop the lock (the file stays: removing it would let two processes lock two files)."""
        if self._handle is None:
            return
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.flush()
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: tree}


def config_differences(stored: dict, current: dict, defaults: dict | None = None) -> dict[str, dict[str, Any]]:
    """Keys (dotted) whose values differ between two configs, except the result-neutral ones:
    ``{key: {"before": stored value, "after": current value}}``. A key missing on one side counts as None, except
    that a key the stored config lacks and ``current`` has at its value in ``defaults`` (a key added by a later
    slca_kit, e.g. ``backbone.source``) is no difference."""
    before, after = _flat(stored), _flat(yaml.safe_load(yaml.safe_dump(current)))  # same types as the stored file
    defaults = _flat(yaml.safe_load(yaml.safe_dump(defaults))) if defaults else {}
    changed = {}
    for key in sorted(set(before) | set(after)):
        if key in RESULT_NEUTRAL_KEYS or key.startswith(tuple(f"{k}." for k in RESULT_NEUTRAL_KEYS)):
            continue
        if key not in before and key in defaults and after.get(key) == defaults[key]:
            continue
        if before.get(key) != after.get(key):
            changed[key] = {"before": before.get(key), "after": after.get(key)}
    return changed


def check_resume_config(run_dir: Path, current: dict, allow_change: bool,
                        defaults: dict | None = None) -> dict[str, dict[str, Any]]:
    """Compare the run's stored ``config.yaml`` with ``current`` (``defaults``: see ``config_differences``); refuse
    result-changing differences unless ``allow_change``. Returns the differences (empty when none, or when the run
    never stored its config)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the run's stored config to compare with: {err}") from None
    changed = config_differences(stored, current, defaults)
    if changed and not allow_change:
        listed = "; ".join(f"{key}: {entry['before']!r} -> {entry['after']!r}"
                           for key, entry in list(changed.items())[:8])
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        raise ConfigError(f"--resume: the recipe differs from the one this run started with ({path}) in "
                          f"{listed}{more}; resume with the same recipe, or add --allow-config-change to continue "
                          "with the new values and record the change in results.json")
    return changed


def record_config_change(run_dir: Path, changed: dict, checkpoint: str) -> None:
    """Append one resume's accepted differences to ``config_changes.json`` (listed in results.json)."""
    path = Path(run_dir) / CHANGES_FILE
    history = read_config_changes(run_dir)
    history.append({"resumed_from": checkpoint, "at": datetime.datetime.now().isoformat(timespec="seconds"),
                    "changed": changed})
    write_json_atomic(path, history)


def read_config_changes(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / CHANGES_FILE
    return list(read_json(path)) if path.is_file() else []
