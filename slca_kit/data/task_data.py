"""Per-task torch datasets: images of the chosen classes with labels remapped to the class order."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .sources import ImageSplit


class TaskDataset(Dataset):
    """Samples of ``split`` whose remapped label is in ``classes``; yields (image tensor, remapped label)."""

    def __init__(self, split: ImageSplit, label_map: np.ndarray, classes: list[int], transform: Callable):
        remapped = label_map[split.labels]
        self.indices = np.flatnonzero(np.isin(remapped, classes))
        self.labels = remapped[self.indices]
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        image = self.split.image(int(self.indices[item]))
        return self.transform(image), int(self.labels[item])


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation drawn from (seed, epoch): the order of any epoch can be reproduced after a resume."""

    def __init__(self, length: int, seed: int):
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())
