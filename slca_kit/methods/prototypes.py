"""Class prototypes, for the methods that classify by cosine similarity to them (linear_probe with ``prototypes``,
APER, EASE, MOS): zhoudw-zdw/RevisitingCIL models/simplecil.py:27-49 ``replace_fc`` (the mean feature of each class)
and convs/linears.py:55-63 ``CosineLinear.forward`` (cosine of normalised features and rows, times sigma = 1)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .base import TaskContext


def class_means(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], classes: list[int], width: int,
                ctx: TaskContext) -> torch.Tensor:
    """Each class's mean feature: ``batches`` are (features [B, width], labels) of this process's share of the
    images of ``classes`` (consecutive label positions); sums and counts are float64 and summed over processes, so
    any number of processes gives the same means. Returns [len(classes), width] float32 on the CPU."""
    sums = torch.zeros(len(classes), width, dtype=torch.float64, device=ctx.device)
    counts = torch.zeros(len(classes), dtype=torch.float64, device=ctx.device)
    for features, labels in batches:
        onehot = F.one_hot(labels.to(ctx.device) - classes[0], len(classes)).to(torch.float64)
        sums += onehot.T @ features.to(device=ctx.device, dtype=torch.float64)
        counts += onehot.sum(0)
    return (ctx.reduce_sum(sums) / ctx.reduce_sum(counts)[:, None]).float().cpu()


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each feature to each prototype (RevisitingCIL convs/linears.py:55-63, sigma 1)."""
    return F.normalize(features, dim=1) @ F.normalize(prototypes.to(features.device), dim=1).T
