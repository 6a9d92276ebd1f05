"""Learning without Forgetting (Li & Hoiem, 2016/2018) on the pretrained ViT (lifelong_methods.md, 4).

While task t is learned, the model as it was after task t-1 -- a frozen snapshot in eval mode, never trained --
labels the new images with soft targets over the earlier classes; the new model's earlier-class logits are
pulled toward them with a temperature-T cross-entropy, next to the current-task cross-entropy (class-incremental
form: one softmax over all earlier classes, as PyCIL's lwf.py).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Method, TaskContext, require_positive


def soft_target_cross_entropy(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """mean over samples of -sum_c softmax(teacher / T)_c log softmax(logits / T)_c (LwF's L_old)."""
    targets = F.softmax(teacher_logits / temperature, dim=1)
    return -(targets * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean()


class LwF(Method):
    name = "lwf"

    @dataclass
    class Params:
        backbone_lr_scale: float = 1.0  # LwF fine-tunes all weights with one lr
        temperature: float = 2.0  # T = 2 (Li & Hoiem, Sec. 3; T=2 in G-U-N/PyCIL models/lwf.py:28)
        # lambda_o = 1 (Li & Hoiem, Sec. 3); PyCIL's class-incremental port weighs it 3 (models/lwf.py:29)
        distill_lambda: float = 1.0

        def __post_init__(self):
            require_positive(self, "temperature")

    def __init__(self, params, config):
        super().__init__(params, config)
        self.old_model: torch.nn.Module | None = None

    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        self.old_model = None
        if ctx.task > 0:
            self.old_model = copy.deepcopy(model).eval().requires_grad_(False)

    def training_loss(self, model, images, labels, ctx: TaskContext) -> torch.Tensor:
        known = ctx.known_classes
        logits = model(images)
        loss = F.cross_entropy(logits[:, known:], labels - known)
        if self.old_model is None:
            return loss
        with torch.no_grad():
            teacher = self.old_model(images)[:, :known]
        distill = soft_target_cross_entropy(logits[:, :known].float(), teacher.float(), self.params.temperature)
        return loss + self.params.distill_lambda * distill

    def end_task(self, model, ctx: TaskContext) -> None:
        self.old_model = None  # task-end checkpoints need no snapshot: the next task takes it from the model

    def state_dict(self) -> dict:
        # Mid-task checkpoints keep the snapshot: after a resume the model no longer holds the previous weights.
        if self.old_model is None:
            return {}
        return {"old_model": {k: v.cpu() for k, v in self.old_model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        # Called after before_task, which built the snapshot's structure from the model being resumed.
        if state.get("old_model") is not None and self.old_model is not None:
            self.old_model.load_state_dict(state["old_model"])
