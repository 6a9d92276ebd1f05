"""``train.feature_cache``: when nothing before the head trains in a task, the task's training features are computed
once and the epochs run on them. View v of an image is its feature under the training transform drawn for epoch v
(the same draw the image path makes at epoch v), or, with 0 views, under the test transform; epoch e trains on view
e mod V. The features are kept in memory and in ``feature_cache/task_NNN.safetensors`` under the run folder, so a
resumed task reads them back instead of recomputing them."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset


def only_head_trains(model: nn.Module) -> bool:
    """True when every trainable parameter belongs to the head (the features then do not change in the task)."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    return bool(trainable) and all(name.startswith("head.") for name in trainable)


class FeatureViews(Dataset):
    """(feature, label) pairs; ``set_epoch(e)`` picks view e mod V."""

    def __init__(self, views: torch.Tensor, labels: torch.Tensor):
        self.views = views  # [V, N, d]
        self.labels = labels  # [N]
        self.view = 0

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % self.views.shape[0]

    def __len__(self) -> int:
        return self.views.shape[1]

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        return self.views[self.view, item], int(self.labels[item])


def cache_file(run_dir: Path, task: int) -> Path:
    return run_dir / "feature_cache" / f"task_{task:03d}.safetensors"


def load_views(path: Path, indices: np.ndarray, views: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (views, labels) if ``path`` holds the same samples and number of views, else None."""
    if not path.is_file():
        return None
    stored = load_file(str(path))
    same = (torch.equal(stored["indices"], torch.as_tensor(indices, dtype=torch.long))
            and stored["views"].shape[0] == max(views, 1))
    return (stored["views"], stored["labels"]) if same else None


def save_views(path: Path, views: torch.Tensor, labels: torch.Tensor, indices: np.ndarray) -> None:
    """Written to a temporary name and renamed, so an interrupted write never leaves a partial cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({"views": views.contiguous().cpu(), "labels": labels.cpu(),
               "indices": torch.as_tensor(indices, dtype=torch.long)}, str(partial))
    os.replace(partial, path)
