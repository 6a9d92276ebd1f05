"""Joint training: after each task, train on the data of every class seen so far (the upper bound)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Method, TaskContext


class Joint(Method):
    name = "joint"

    @dataclass
    class Params:
        # Same slow-learner lrs as SLCA so the gap to SLCA measures sequential training alone (our choice;
        # the SLCA paper does not state the joint model's lrs).
        backbone_lr_scale: float = 0.01

    def training_classes(self, ctx: TaskContext) -> list[int]:
        return list(range(ctx.seen_classes))

    def before_task(self, model, ctx: TaskContext) -> None:
        model.head.requires_grad_(True)

    def training_loss(self, model, images: torch.Tensor, labels: torch.Tensor, ctx: TaskContext) -> torch.Tensor:
        return F.cross_entropy(model(images), labels)
