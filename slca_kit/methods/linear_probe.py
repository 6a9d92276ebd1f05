"""Frozen pretrained backbone: a linear head per task, or SimpleCIL-style class prototypes (cosine classifier):
zhoudw-zdw/RevisitingCIL models/simplecil.py:27-49 (``replace_fc``: each class's mean training feature under the
test transform becomes its row of a ``CosineLinear``, convs/linears.py:55-63, sigma 1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, TaskContext
from .prototypes import class_means, cosine_logits


class LinearProbe(Method):
    name = "linear_probe"

    @dataclass
    class Params:
        # False: train a linear head per task on frozen features (current-task cross-entropy).
        # True: SimpleCIL (Zhou et al. 2023): no training, the classifier is each class's mean feature and the
        # logit is the cosine similarity to it.
        prototypes: bool = False

    def __init__(self, params, config):
        super().__init__(params, config)
        self.prototypes: torch.Tensor | None = None  # [seen classes, d], float32

    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        model.backbone.requires_grad_(False)

    def train_epochs(self, ctx: TaskContext) -> int:
        return 0 if self.params.prototypes else self.config.train.epochs

    def after_training(self, model, ctx: TaskContext) -> None:
        if not self.params.prototypes:
            return
        classes = ctx.scenario.task_classes(ctx.task)
        with ctx.timer("statistics"):
            means = class_means([ctx.extract_features(classes, "train")], classes, model.backbone.num_features, ctx)
        self.prototypes = means if self.prototypes is None else torch.cat([self.prototypes, means])

    def predict(self, model, images: torch.Tensor, ctx: TaskContext) -> torch.Tensor:
        if not self.params.prototypes:
            return model(images)
        return cosine_logits(model.features(images).float(), self.prototypes)

    def state_dict(self) -> dict:
        return {"prototypes": self.prototypes}

    def load_state_dict(self, state: dict) -> None:
        self.prototypes = state.get("prototypes")
