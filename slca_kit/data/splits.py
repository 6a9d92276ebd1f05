"""Named train/test splits (``data.split``) and a fingerprint of the split, so that a run says which images it was
tested on.

- ``official``: the source's own train and test splits.
- ``reference``: the split the SLCA reference code trains and tests on for this benchmark: Cars-196 trains on the
  official TEST set and tests on the official train set (GengDavid/SLCA split_car.py copies images whose ``test``
  flag is 1 into ``train/``); ImageNet-R uses ``dualprompt`` (the split its issue #1 points to); others ``official``.
- ``stratified``: each class's images permuted with ``data.split_seed``, the first ``test_fraction`` to test.
- ``dualprompt``: JH-LEE-KR/dualprompt-pytorch continual_datasets/continual_datasets.py, class ``Imagenet_R``:
  ``torch.utils.data.random_split`` of the WHOLE ImageFolder (classes sorted, files sorted) into int(0.8 N) / rest,
  drawn from the global generator right after ``torch.manual_seed(42)`` (main.py, --seed 42), i.e.
  ``randperm(N)[:int(0.8 N)]`` for training. Not per class.
- ``coda``: the file lists GT-RIPL/CODA-Prompt ships (dataloaders/splits/imagenet-r_{train,test}.yaml), read from
  ``data.split_lists``; each entry is matched to an image by its last two path components (class folder / file).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import yaml

from ..config import DataConfig
from ..errors import DataError

REFERENCE_SPLITS = {"cars196": "swapped", "imagenet_r": "dualprompt"}
DUALPROMPT_SEED = 42  # dualprompt-pytorch main.py: torch.manual_seed(args.seed), --seed 42
DUALPROMPT_TRAIN_FRACTION = 0.8  # continual_datasets.py: train_size = int(0.8 * len(self.dataset))


def resolved_split(cfg: DataConfig) -> str:
    """The split actually made: ``data.split``, or ``stratified`` when only ``test_fraction`` is set, else
    ``official``; ``reference`` resolved per benchmark."""
    name = cfg.split or ("stratified" if cfg.test_fraction is not None else "official")
    if name == "reference":
        return REFERENCE_SPLITS.get(cfg.benchmark or "", "official")
    return name


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: each class's indices are permuted with ``seed`` and the first
    ``round(test_fraction * n)`` go to test. Per class, so every class appears in both splits."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def imagefolder_order(sample_ids: list[str], labels: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Indices in torchvision ImageFolder's order: class folders sorted by name, files sorted within a class."""
    return np.asarray(sorted(range(len(sample_ids)), key=lambda i: (class_names[labels[i]], sample_ids[i])),
                      dtype=np.int64)


def dualprompt_split(sample_ids: list[str], labels: np.ndarray, class_names: list[str]) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """dualprompt-pytorch's ImageNet-R split, reproduced exactly given the same files: indices into the source,
    each split in ImageFolder order (as the reference re-reads its written train/ and test/ folders)."""
    canonical = imagefolder_order(sample_ids, labels, class_names)
    generator = torch.Generator().manual_seed(DUALPROMPT_SEED)  # the same stream as the global one after seeding
    permutation = torch.randperm(len(canonical), generator=generator).numpy()
    n_train = int(DUALPROMPT_TRAIN_FRACTION * len(canonical))
    # sorted positions in the canonical list = each split in ImageFolder order
    return canonical[np.sort(permutation[:n_train])], canonical[np.sort(permutation[n_train:])]


def read_split_list(path: str) -> list[str]:
    """One CODA-Prompt list (YAML with a ``data`` list of image paths) as class-folder/file ids."""
    try:
        entries = yaml.safe_load(Path(path).read_text(encoding="utf-8"))["data"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise DataError(f"data.split_lists: cannot read {path} as a CODA-Prompt split list ('data: [paths]'): "
                        f"{err}") from None
    return ["/".join(str(entry).replace("\\", "/").split("/")[-2:]) for entry in entries]


def listed_split(sample_ids: list[str], lists: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the images named by the train and test lists, in list order."""
    if len(lists) != 2:
        raise DataError(f"data.split_lists: give two files, [train list, test list], got {lists}")
    position = {sample_id: index for index, sample_id in enumerate(sample_ids)}
    result = []
    for path in lists:
        wanted = read_split_list(path)
        missing = [entry for entry in wanted if entry not in position]
        if missing:
            raise DataError(f"data.split_lists: {len(missing)} images of {path} are not in the data, e.g. "
                            f"{missing[:3]}")
        result.append(np.asarray([position[entry] for entry in wanted], dtype=np.int64))
    return result[0], result[1]


def fingerprint(sample_ids: list[str], labels: np.ndarray) -> str:
    """A short hash of (image id, label) pairs in split order: equal fingerprints, equal test sets."""
    digest = hashlib.sha256()
    for sample_id, label in zip(sample_ids, labels.tolist()):
        digest.update(f"{sample_id}\t{label}\n".encode())
    return digest.hexdigest()[:16]
