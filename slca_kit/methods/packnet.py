"""PackNet (Mallya & Lazebnik, CVPR 2018) on the pretrained ViT (lifelong_methods.md, 2).

The weights of the targeted Linear layers (default: every Linear layer of the backbone, as the paper packs every
layer but the classifier; on timm's ViT that is each block's qkv, proj, fc1, fc2) are shared out among tasks.
Task t trains all weights no earlier task owns ("free"), with earlier tasks' weights frozen; then magnitude pruning
keeps the largest ``1 - prune_fraction`` of the free weights of each layer for task t and releases the others
(set to 0), and the kept ones are retrained (``retrain_epochs``). With ``prune_rounds > 1`` pruning is iterative:
each round keeps a further share, reaching the same final fraction, and is followed by retraining.

Task j's network uses only the weights of tasks 0..j (later tasks' weights read as 0): task-incremental accuracy
uses the test sample's task. Class-incremental prediction runs every task's network and answers with the task
whose head is most confident (highest softmax probability).

Differences from the paper, on purpose: the paper's first task is the pretraining data itself (pruned and retrained
on ImageNet); here the pretrained ViT is kept as the starting point, so released weights start the next task from
their pretrained values (``free_weights_init: pretrained``; ``zero`` is the paper's behaviour for later tasks), and
the backbone's other parameters (embeddings, norms, biases) stay frozen at their pretrained values.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Method, TaskContext


class PackNet(Method):
    name = "packnet"
    needs_task_id = True

    @dataclass
    class Params:
        backbone_lr_scale: float = 1.0  # one lr for the packed weights, as in the paper
        prune_fraction: float = 0.75  # share of a task's free weights released after training (paper: 0.5 / 0.75)
        prune_rounds: int = 1  # the paper prunes once per task; > 1 is iterative pruning
        retrain_epochs: int = 10  # after each pruning round (paper: 10 epochs)
        # a regex over parameter names; None: the weight of every Linear layer in the backbone, on timm's ViT and
        # transformers' alike (arunmallya/packnet src/prune.py:58-60 packs every Conv2d / Linear of the shared
        # trunk; the ViT's one Conv2d, the patch embedding, stays frozen here)
        target_modules: str | None = None
        free_weights_init: str = "pretrained"  # pretrained | zero (see the module docstring)

        def __post_init__(self):
            if not 0 <= self.prune_fraction < 1:
                raise ConfigError(f"method.params.prune_fraction: must be in [0, 1), got {self.prune_fraction}")
            if self.prune_rounds < 1 or self.retrain_epochs < 0:
                raise ConfigError("method.params: prune_rounds must be >= 1 and retrain_epochs >= 0, got "
                                  f"{self.prune_rounds} and {self.retrain_epochs}")
            if self.free_weights_init not in ("pretrained", "zero"):
                raise ConfigError(f"method.params.free_weights_init: {self.free_weights_init!r} is not one of "
                                  "pretrained, zero")

    def __init__(self, params, config):
        super().__init__(params, config)
        self.owner: dict[str, torch.Tensor] = {}  # int16 per weight: 0 free, t + 1 owned by task t
        self.initial: dict[str, torch.Tensor] = {}  # pretrained values, the start of free weights
        self.rounds_done = 0  # pruning rounds of the current task
        # name -> (parameter, trainable mask, fixed values), set each epoch for the per-step restore
        self._fixed: dict[str, tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = {}
        self._full: dict[str, torch.Tensor] = {}  # full weights while another task's view is applied
        self._view: int | None = None

    # -- which weights ----------------------------------------------------------------------------
    def packed(self, model) -> dict[str, torch.nn.Parameter]:
        if self.params.target_modules is None:
            named = {f"backbone.{name}.weight": module.weight for name, module in model.backbone.named_modules()
                     if isinstance(module, torch.nn.Linear)}
            if not named:
                raise ConfigError("method.params.target_modules: the backbone has no Linear layer; name the "
                                  "parameters to pack with a regex")
            return named
        pattern = re.compile(self.params.target_modules)
        named = {name: p for name, p in model.named_parameters() if pattern.fullmatch(name)}
        if not named:
            raise ConfigError(f"method.params.target_modules: {self.params.target_modules!r} matches no parameter")
        return named

    def train_epochs(self, ctx: TaskContext) -> int:
        return self.config.train.epochs + self.params.prune_rounds * self.params.retrain_epochs

    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        self.restore_full(model)
        packed = self.packed(model)
        model.backbone.requires_grad_(False)
        for name, p in packed.items():
            p.requires_grad_(True)
            if name not in self.owner:
                self.owner[name] = torch.zeros(p.shape, dtype=torch.int16)
                if self.params.free_weights_init == "pretrained":
                    self.initial[name] = p.detach().cpu().clone()
            if ctx.task > 0:
                free = (self.owner[name] == 0).to(p.device)
                start = self.initial[name].to(p.device) if self.initial else torch.zeros_like(p)
                with torch.no_grad():
                    p.copy_(torch.where(free, start.to(p.dtype), p))
        self.rounds_done = 0

    def before_epoch(self, model, ctx: TaskContext, epoch: int) -> None:
        params = self.params
        first_prune = self.config.train.epochs
        due = [first_prune + k * params.retrain_epochs for k in range(params.prune_rounds)]
        while self.rounds_done < params.prune_rounds and epoch >= due[self.rounds_done]:
            self.prune(model, ctx.task, self.rounds_done + 1)
            self.rounds_done += 1
        # Trainable: free weights before the first pruning, the task's own weights after it; the rest is held.
        trainable_owner = 0 if self.rounds_done == 0 else ctx.task + 1
        self._fixed = {}
        for name, p in self.packed(model).items():
            trainable = self.owner[name].to(p.device) == trainable_owner
            self._fixed[name] = (p, trainable, p.detach().clone())

    def prune(self, model, task: int, round_index: int) -> None:
        """Keep, per layer, the largest (1 - prune_fraction)^(round / rounds) of the weights that were free at the
        task's start as task ``task``'s; release (zero) the rest."""
        keep_share = (1 - self.params.prune_fraction) ** (round_index / self.params.prune_rounds)
        for name, p in self.packed(model).items():
            owner = self.owner[name].to(p.device)
            candidates = (owner == 0) | (owner == task + 1)
            available = int(candidates.sum())
            keep = int(round(keep_share * available))
            scores = torch.where(candidates, p.detach().abs().float(), torch.full_like(p, -1.0, dtype=torch.float32))
            kept = torch.zeros_like(candidates)
            if keep > 0:
                kept.view(-1)[torch.topk(scores.flatten(), keep).indices] = True
            owner = torch.where(kept, torch.full_like(owner, task + 1), torch.where(candidates, 0, owner))
            self.owner[name] = owner.cpu()
            with torch.no_grad():
                p.masked_fill_(candidates & ~kept, 0.0)

    def after_optimizer_step(self, model, ctx: TaskContext) -> None:
        # Exactly frozen: undo what momentum / weight decay did to held weights (gradient masks would not).
        with torch.no_grad():
            for p, trainable, fixed in self._fixed.values():
                p.copy_(torch.where(trainable, p, fixed))

    # -- task views ---------------------------------------------------------------------------------
    def apply_view(self, model, task: int) -> None:
        """Make the packed weights task ``task``'s network: weights of tasks after ``task`` read as 0."""
        if self._view == task:
            return
        packed = self.packed(model)
        if not self._full:
            self._full = {name: p.detach().clone() for name, p in packed.items()}
        with torch.no_grad():
            for name, p in packed.items():
                owner = self.owner[name].to(p.device)
                p.copy_(torch.where((owner >= 1) & (owner <= task + 1), self._full[name], 0.0))
        self._view = task

    def restore_full(self, model) -> None:
        if self._full:
            with torch.no_grad():
                for name, p in self.packed(model).items():
                    p.copy_(self._full[name])
        self._full, self._view = {}, None

    def predict_task(self, model, images, task: int, ctx: TaskContext) -> torch.Tensor:
        self.apply_view(model, task)
        offset = ctx.scenario.task_offset(task)
        return model(images)[:, offset:offset + ctx.scenario.task_sizes[task]]

    def predict(self, model, images, ctx: TaskContext) -> torch.Tensor:
        """Each task's network and head; the most confident head's logits, -inf for the other classes."""
        blocks = [self.predict_task(model, images, task, ctx).float() for task in range(ctx.task + 1)]
        confidence = torch.stack([F.softmax(block, dim=1).max(dim=1).values for block in blocks], dim=1)
        chosen = confidence.argmax(dim=1)
        logits = torch.full((len(images), ctx.seen_classes), float("-inf"), device=images.device)
        for task, block in enumerate(blocks):
            offset = ctx.scenario.task_offset(task)
            rows = chosen == task
            logits[rows, offset:offset + block.shape[1]] = block[rows]
        return logits

    def end_task(self, model, ctx: TaskContext) -> None:
        self.restore_full(model)

    def task_summary(self, model, ctx: TaskContext) -> dict:
        owners = torch.cat([o.flatten() for o in self.owner.values()])
        total = owners.numel()
        return {"packed_weights": total,
                "owned_fraction": [round(float((owners == t + 1).sum()) / total, 6) for t in range(ctx.task + 1)],
                "free_fraction": round(float((owners == 0).sum()) / total, 6)}

    def state_dict(self) -> dict:
        return {"owner": self.owner, "initial": self.initial, "rounds_done": self.rounds_done}

    def load_state_dict(self, state: dict) -> None:
        self.owner = dict(state["owner"])
        self.initial = dict(state["initial"])
        self.rounds_done = int(state["rounds_done"])
