"""CoFiMA: Continual Fisher-weighted Model Averaging (Marouf et al., ECCV 2024), as IemProg/CoFiMA models/cofima.py
does it: SLCA (the slow learner, class statistics and classifier alignment: ``SLCA``'s hooks, not a copy), plus,
after each task's training and before its statistics, an average of the backbone with the previous task's final
backbone, weighted per parameter by each task's diagonal Fisher information:

    theta = ((1 - a) F_prev theta_prev + a F_cur theta_cur) / ((1 - a) F_prev + a F_cur)      (cofima.py:61-67)

F is the mean over the task's training batches of the squared gradient of the cross-entropy over every seen
class's logit, clamped at 1e-4 (cofima.py:199-221); F_prev is the one computed at the end of the previous task,
before its own averaging (cofima.py:171-182). Statistics and alignment then use the averaged backbone
(cofima.py:190-193).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import TaskContext, require_positive
from .slca import SLCA


def fisher_weighted_average(previous: torch.Tensor, current: torch.Tensor, fisher_previous: torch.Tensor,
                            fisher_current: torch.Tensor, alpha: float) -> torch.Tensor:
    """cofima.py:61-67; where both Fisher values are 0 (the official code would divide 0 by 0), the plain
    (1 - alpha, alpha) average."""
    weight_previous, weight_current = (1 - alpha) * fisher_previous, alpha * fisher_current
    total = weight_previous + weight_current
    weighted = (weight_previous * previous + weight_current * current) / total.where(total > 0, torch.ones_like(total))
    return weighted.where(total > 0, (1 - alpha) * previous + alpha * current)


class CoFiMA(SLCA):
    name = "cofima"

    @dataclass
    class Params(SLCA.Params):
        wt_alpha: float = 0.4  # exps/cofima/cofima_cifar.json, cofima_imgnetr.json; 0.5 for CUB and Cars
        fisher_max: float = 1e-4  # fishermax (cofima.py:31)
        fisher_batch_size: int = 128  # the training loader's batch_size (cofima.py:24)

        def __post_init__(self):
            super().__post_init__()
            require_positive(self, "fisher_max", "fisher_batch_size")
            if not 0 <= self.wt_alpha <= 1:
                raise ConfigError(f"method.params.wt_alpha: must be between 0 and 1, got {self.wt_alpha}")

    def __init__(self, params, config):
        super().__init__(params, config)
        self.previous_backbone: dict[str, torch.Tensor] = {}  # the previous task's final (averaged) backbone
        self.previous_fisher: dict[str, torch.Tensor] = {}  # its Fisher, computed before its own averaging

    def after_training(self, model, ctx: TaskContext) -> None:
        with ctx.timer("fisher averaging"):
            fisher = self.fisher(model, ctx)
            if ctx.task > 0:
                self._average(model, fisher)
            self.previous_fisher = {name: f.cpu() for name, f in fisher.items()}
            self.previous_backbone = {name: p.detach().cpu().clone() for name, p in self._tracked(model).items()}
        super().after_training(model, ctx)  # class statistics of the averaged backbone, then alignment

    @staticmethod
    def _tracked(model) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in model.backbone.named_parameters() if p.requires_grad}

    def fisher(self, model, ctx: TaskContext) -> dict[str, torch.Tensor]:
        """Mean over batches of the squared gradient of the batch's cross-entropy over all seen classes, clamped
        at ``fisher_max`` (cofima.py:199-221); batches of the task's training images, from every process."""
        tracked = self._tracked(model)
        sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in tracked.items()}
        batches = torch.zeros((), device=ctx.device)
        for images, labels in ctx.iterate_images(ctx.scenario.task_classes(ctx.task), "train",
                                                 self.params.fisher_batch_size):
            loss = F.cross_entropy(model(images)[:, :ctx.seen_classes].float(), labels)
            grads = torch.autograd.grad(loss, list(tracked.values()))
            for name, grad in zip(tracked, grads):
                sums[name] += grad.float() ** 2
            batches += 1
        batches = ctx.reduce_sum(batches).clamp_min(1)
        return {name: (ctx.reduce_sum(total) / batches).clamp(max=self.params.fisher_max)
                for name, total in sums.items()}

    def _average(self, model, fisher: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self._tracked(model).items():
                merged = fisher_weighted_average(self.previous_backbone[name].to(p.device), p.float(),
                                                 self.previous_fisher[name].to(p.device), fisher[name],
                                                 self.params.wt_alpha)
                p.copy_(merged.to(p.dtype))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "previous_backbone": self.previous_backbone,
                "previous_fisher": self.previous_fisher}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.previous_backbone = dict(state.get("previous_backbone", {}))
        self.previous_fisher = dict(state.get("previous_fisher", {}))
