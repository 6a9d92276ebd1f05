"""Where a result came from, recorded in every results.json: code (slca_kit version and git commit, library
versions), model (timm tag, SHA-256 of a local weights file), data (source, Hub id and revision or local path,
fingerprints of the train and test samples) and how it ran (device, processes, precision). ``slca reproduce``
compares these across the runs of one cell (docs/reproduce.md)."""
from __future__ import annotations

import functools
import hashlib
import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "timm", "peft", "accelerate", "datasets", "transformers", "numpy")


@functools.lru_cache(maxsize=None)
def git_commit(package: Path) -> str | None:
    """The commit of the slca_kit checkout ``package`` is in (``-dirty`` with uncommitted changes); None for an
    installed wheel, even one inside some other git repository. Read once per process: the code that runs is the
    code imported at its start, whatever is committed later (``slca reproduce`` runs seeds one after the other)."""
    if not (package.parent / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=package,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty else "")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_fingerprint(name: str, revision: str | None) -> dict:
    """A transformers checkpoint: for a local folder, one SHA-256 over its weight files' names and hashes; for a
    Hub id, the revision asked for."""
    folder = Path(name)
    if not folder.is_dir():
        return {"revision": revision or "latest", "files_sha256": None}
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    listing = "".join(f"{path.name} {file_sha256(path)}\n" for path in files)
    return {"revision": None, "files_sha256": hashlib.sha256(listing.encode()).hexdigest() if files else None}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def collect(config, data, accelerator) -> dict:
    """The provenance block of results.json (``data`` is the loaded ``LoadedData``)."""
    from . import __version__
    from .data.splits import fingerprint

    backbone = config.backbone
    if backbone.source == "transformers":
        weights = {"transformers_name": backbone.name, "pretrained": backbone.pretrained,
                   **checkpoint_fingerprint(backbone.name, backbone.revision)}
    else:
        weights = {"timm_name": backbone.name, "pretrained_from_hub": backbone.pretrained and not backbone.weights,
                   "file": backbone.weights, "file_sha256": file_sha256(backbone.weights) if backbone.weights else None}
    cfg = config.data
    source = {"source": cfg.source, "benchmark": cfg.benchmark}
    if cfg.source == "hub":
        source.update(hub_id=cfg.hub_id, hub_config=cfg.hub_config, revision=cfg.hub_revision or "latest")
    elif cfg.source in ("arrays", "imagefolder"):
        source["path"] = str(Path(cfg.path).resolve())
    return {
        "slca_kit": __version__,
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "backbone": weights,
        "data": {**source, "split": data.split.get("split"),
                 "train_fingerprint": fingerprint(data.train.sample_ids(), data.train.labels),
                 "test_fingerprint": fingerprint(data.test.sample_ids(), data.test.labels)},
        "device": accelerator.device.type,
        "num_processes": accelerator.num_processes,
        "mixed_precision": config.train.mixed_precision,
    }
