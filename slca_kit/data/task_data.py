"""Per-task torch datasets: images of the chosen classes with labels remapped to the class order."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .sources import ImageSplit


class TaskDataset(Dataset):
    """Samples of ``split`` whose remapped label is in ``classes``, plus the samples at ``extra_indices`` (e.g. a
    replay buffer); yields (image tensor, remapped label).

    With ``augment_seed`` set, the random transform of each image is seeded from (seed, epoch, image index), so
    augmentation does not depend on the number of processes, data-loader workers, or where a run was resumed."""

    def __init__(self, split: ImageSplit, label_map: np.ndarray, classes: list[int], transform: Callable,
                 augment_seed: int | None = None, extra_indices: list[int] | None = None):
        remapped = label_map[split.labels]
        self.indices = np.flatnonzero(np.isin(remapped, classes))
        if extra_indices:
            self.indices = np.union1d(self.indices, np.asarray(extra_indices, dtype=np.int64))
        self.labels = remapped[self.indices]
        self.split = split
        self.transform = transform
        self.augment_seed = augment_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[item])
        if self.augment_seed is None:
            return self._load(index), int(self.labels[item])
        # Only the CPU generator, which torchvision's transforms draw from, is seeded and then restored: the global
        # RNG (dropout, drop-path) is left as it was. torch.manual_seed would also seed every accelerator's
        # generator and costs 170-190 us an image, against 2-3 us (benchmarks/data_pipeline.py).
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(((self.augment_seed * 1_000_003 + self.epoch) * 100_003 + index) % 2**63)
        try:
            return self._load(index), int(self.labels[item])
        finally:
            generator.set_state(state)

    def _load(self, index: int):
        """Image ``index`` of the split, transformed (random draws under the seed set by ``__getitem__``)."""
        return self.transform(self.split.image(index))


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation drawn from (seed, epoch): the order of any epoch can be reproduced after a resume, and
    ``skip_next`` leaves out its first samples once, to continue an epoch where a preempted run stopped."""

    def __init__(self, length: int, seed: int):
        self.length = length
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, count: int) -> None:
        """The next pass starts at position ``count`` of the epoch's permutation."""
        self.skip = count

    def __len__(self) -> int:
        return max(self.length - self.skip, 0)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()[self.skip:]
        self.skip = 0
        return iter(order)
