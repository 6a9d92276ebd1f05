"""Exemplar replay (lifelong_methods.md, 3): a bounded buffer of earlier classes' training images, mixed into
every later task's training data and shuffled with it; one cross-entropy over all seen classes.

Exemplars are chosen after each task, from the features of the model as trained so far (TEST transform):
herding as in iCaRL (Rebuffi et al. 2017, Alg. 4) or uniformly at random. The budget is a fixed total
(``memory_size``, shared equally among seen classes, so older classes shrink) or fixed per class
(``memory_per_class``). Herding orders each class's exemplars, so shrinking keeps the first ones (iCaRL Alg. 5).
The buffer holds sample indices into the training split and is kept in checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Method, TaskContext


def herding_order(features: torch.Tensor, count: int) -> list[int]:
    """iCaRL herding: greedily pick, without replacement, the sample that brings the running mean of the picked
    L2-normalised features closest to the class mean. Returns row positions in picking order."""
    normalized = F.normalize(features.double(), dim=1)
    target = normalized.mean(0)
    picked: list[int] = []
    running = torch.zeros_like(target)
    available = torch.ones(len(normalized), dtype=torch.bool, device=normalized.device)
    for k in range(1, min(count, len(normalized)) + 1):
        distances = ((target - (running + normalized) / k) ** 2).sum(1)
        distances[~available] = float("inf")
        choice = int(torch.argmin(distances))
        picked.append(choice)
        available[choice] = False
        running += normalized[choice]
    return picked


class Replay(Method):
    name = "replay"

    @dataclass
    class Params:
        backbone_lr_scale: float = 1.0
        memory_size: int | None = 2000  # total exemplars (iCaRL / PyCIL on CIFAR-100)
        memory_per_class: int | None = None  # fixed per class instead (set memory_size to null)
        selection: str = "herding"  # herding | random

        def __post_init__(self):
            if (self.memory_size is None) == (self.memory_per_class is None):
                raise ConfigError("method.params: set exactly one of memory_size (fixed total) and memory_per_class "
                                  f"(fixed per class); got memory_size={self.memory_size}, "
                                  f"memory_per_class={self.memory_per_class}")
            if self.selection not in ("herding", "random"):
                raise ConfigError(f"method.params.selection: {self.selection!r} is not one of herding, random")

    def __init__(self, params, config):
        super().__init__(params, config)
        self.exemplars: dict[int, list[int]] = {}  # class -> training-split indices, in selection order

    def per_class_budget(self, seen_classes: int) -> int:
        if self.params.memory_per_class is not None:
            return self.params.memory_per_class
        return self.params.memory_size // seen_classes

    def extra_training_samples(self, ctx: TaskContext) -> list[int]:
        return sorted(index for indices in self.exemplars.values() for index in indices)

    def before_task(self, model, ctx: TaskContext) -> None:
        model.head.requires_grad_(True)  # old classes' heads train on their exemplars

    def training_loss(self, model, images, labels, ctx: TaskContext) -> torch.Tensor:
        return F.cross_entropy(model(images), labels)

    def after_training(self, model, ctx: TaskContext) -> None:
        budget = self.per_class_budget(ctx.seen_classes)
        self.exemplars = {label: indices[:budget] for label, indices in self.exemplars.items()}
        classes = ctx.scenario.task_classes(ctx.task)
        with ctx.timer("exemplars"):
            features, labels, indices = ctx.gather_features(classes, "train")
            for label in classes:
                members = torch.nonzero(labels == label).flatten()
                if self.params.selection == "herding":
                    order = herding_order(features[members], budget)
                else:
                    generator = torch.Generator().manual_seed(self.config.train.seed * 100_003 + label)
                    order = torch.randperm(len(members), generator=generator)[:budget].tolist()
                self.exemplars[label] = [int(indices[members[k]]) for k in order]

    def task_summary(self, model, ctx: TaskContext) -> dict:
        return {"buffer_size": sum(len(v) for v in self.exemplars.values()),
                "per_class_budget": self.per_class_budget(ctx.seen_classes)}

    def state_dict(self) -> dict:
        return {"exemplars": {str(k): v for k, v in self.exemplars.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.exemplars = {int(k): list(v) for k, v in state["exemplars"].items()}
