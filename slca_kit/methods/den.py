"""Dynamically Expandable Networks (Yoon et al., ICLR 2018) as an MLP stack on the frozen pretrained ViT's
features (lifelong_methods.md, 5).

Every hidden unit carries the task interval [born, retired) in which it is part of the network, so each task's
network ("view") is well defined: task j uses the units with born <= j < retired and its own output block.
For task t (features of the task's training images, TEST transform, gathered from all processes):

- t = 0: train everything with L1 sparsity.
- Selective retraining: train the new output block alone with L1; breadth-first search from its output units down
  the non-zero weights gives the sub-network S; retrain only S's incoming weights (and the block) with L2.
- Dynamic expansion: if the training loss is still above ``loss_threshold``, add ``expand_units`` units per hidden
  layer, train their weights with L1 + group lasso (one group per new unit's incoming weights), and remove the new
  units whose group became zero.
- Split / duplication: a selected unit whose incoming weights drifted by rho = ||w_t - w_(t-1)||_2 >
  ``split_threshold`` is duplicated: the copy (born t) keeps the new weights for task t on, the original gets its
  old weights back and retires at t, so earlier tasks keep their unit.

L1 and group lasso are applied as proximal steps after each Adam update (soft-thresholding), so weights and units
become exactly zero, which the search and the pruning need. Differences from the paper, on purpose: no retraining
after the split (task t's network is unchanged by it: the copy carries exactly the retrained weights), and the
output layers of earlier tasks are never retrained. Unit counts per task are reported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..finite import ensure_finite_loss
from .base import Method, TaskContext, require_positive

NEVER = 2**31 - 1  # "not retired"


class ResizeOnLoad(nn.Module):
    """Loading a state dict whose tensors have other shapes (units were added or removed) resizes them first."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for registry in (self._parameters, self._buffers):
            for name, tensor in list(registry.items()):
                incoming = state_dict.get(prefix + name)
                if tensor is not None and incoming is not None and incoming.shape != tensor.shape:
                    resized = torch.empty(incoming.shape, dtype=tensor.dtype, device=tensor.device)
                    registry[name] = nn.Parameter(resized, tensor.requires_grad) if registry is self._parameters \
                        else resized
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class OutputBlock(ResizeOnLoad):
    def __init__(self, in_features: int, num_classes: int, device=None):
        super().__init__()
        layer = nn.Linear(in_features, num_classes, device=device)
        self.weight, self.bias = layer.weight, layer.bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


class DENNetwork(ResizeOnLoad):
    """Hidden layers whose units are added, removed and split over tasks, and one output block per task; used as
    the model's head (same interface as ``IncrementalHead``)."""

    def __init__(self, in_features: int, hidden: list[int]):
        super().__init__()
        self.in_features = in_features
        self.depth = len(hidden)
        widths = [in_features] + list(hidden)
        for l in range(self.depth):
            layer = nn.Linear(widths[l], widths[l + 1])
            setattr(self, f"weight_{l}", layer.weight)
            setattr(self, f"bias_{l}", layer.bias)
            self.register_buffer(f"born_{l}", torch.zeros(widths[l + 1], dtype=torch.long))
            self.register_buffer(f"retired_{l}", torch.full((widths[l + 1],), NEVER, dtype=torch.long))
        self.heads = nn.ModuleList()

    # -- structure ----------------------------------------------------------------------------------
    def weight(self, l: int) -> nn.Parameter:
        return getattr(self, f"weight_{l}")

    def bias(self, l: int) -> nn.Parameter:
        return getattr(self, f"bias_{l}")

    def born(self, l: int) -> torch.Tensor:
        return getattr(self, f"born_{l}")

    def retired(self, l: int) -> torch.Tensor:
        return getattr(self, f"retired_{l}")

    def width(self, l: int) -> int:
        return self.weight(l).shape[0]

    def active(self, l: int, task: int) -> torch.Tensor:
        return (self.born(l) <= task) & (task < self.retired(l))

    def add_task(self, num_classes: int) -> OutputBlock:
        block = OutputBlock(self.width(self.depth - 1), num_classes, device=self.weight(0).device)
        self.heads.append(block)
        return block

    @property
    def task_sizes(self) -> list[int]:
        return [block.out_features for block in self.heads]

    def _set(self, name: str, tensor: torch.Tensor, owner: nn.Module | None = None) -> None:
        owner = owner or self
        if name in owner._parameters:
            owner._parameters[name] = nn.Parameter(tensor.detach(), owner._parameters[name].requires_grad)
        else:
            owner._buffers[name] = tensor

    def add_units(self, l: int, count: int, task: int, rows: torch.Tensor | None = None,
                  biases: torch.Tensor | None = None, out_columns: torch.Tensor | None = None) -> None:
        """Append ``count`` units born at ``task`` to hidden layer ``l``: incoming ``rows`` (default: nn.Linear's
        init), ``biases`` (default 0), outgoing ``out_columns`` into the next layer / the current task's output
        block (default 0; earlier tasks' blocks never see them)."""
        weight = self.weight(l)
        if rows is None:
            bound = 1 / math.sqrt(weight.shape[1])
            rows = torch.empty(count, weight.shape[1], device=weight.device).uniform_(-bound, bound)
        biases = torch.zeros(count, device=weight.device) if biases is None else biases
        self._set(f"weight_{l}", torch.cat([weight.detach(), rows.to(weight)]))
        self._set(f"bias_{l}", torch.cat([self.bias(l).detach(), biases.to(weight)]))
        self._set(f"born_{l}", torch.cat([self.born(l), torch.full((count,), task, device=weight.device)]))
        self._set(f"retired_{l}", torch.cat([self.retired(l), torch.full((count,), NEVER, device=weight.device)]))
        if l + 1 < self.depth:
            following = self.weight(l + 1)
            columns = out_columns if out_columns is not None else torch.zeros(following.shape[0], count)
            self._set(f"weight_{l + 1}", torch.cat([following.detach(), columns.to(following)], dim=1))
        else:
            block = self.heads[-1]
            columns = out_columns if out_columns is not None else torch.zeros(block.out_features, count)
            self._set("weight", torch.cat([block.weight.detach(), columns.to(block.weight)], dim=1), block)

    def remove_units(self, l: int, units: torch.Tensor) -> None:
        """Delete hidden units (positions in layer ``l``) and their outgoing weights."""
        keep = torch.ones(self.width(l), dtype=torch.bool, device=units.device)
        keep[units] = False
        self._set(f"weight_{l}", self.weight(l).detach()[keep])
        self._set(f"bias_{l}", self.bias(l).detach()[keep])
        self._set(f"born_{l}", self.born(l)[keep])
        self._set(f"retired_{l}", self.retired(l)[keep])
        if l + 1 < self.depth:
            self._set(f"weight_{l + 1}", self.weight(l + 1).detach()[:, keep])
            return
        for block in self.heads:  # blocks narrower than the first removed unit never saw it
            width = block.weight.shape[1]
            if width > int(units.min()):
                self._set("weight", block.weight.detach()[:, keep[:width]], block)

    def split_unit(self, l: int, unit: int, old_row: torch.Tensor, old_bias: torch.Tensor, task: int) -> None:
        """Duplicate ``unit``: the copy (born ``task``) takes its current weights, the original gets ``old_row`` /
        ``old_bias`` back and retires at ``task``."""
        following = self.weight(l + 1) if l + 1 < self.depth else self.heads[-1].weight
        self.add_units(l, 1, task, rows=self.weight(l).detach()[unit:unit + 1],
                       biases=self.bias(l).detach()[unit:unit + 1], out_columns=following.detach()[:, unit:unit + 1])
        with torch.no_grad():
            self.weight(l)[unit, :old_row.numel()] = old_row
            self.weight(l)[unit, old_row.numel():] = 0.0
            self.bias(l)[unit] = old_bias
        self.retired(l)[unit] = task

    # -- forward ------------------------------------------------------------------------------------
    def task_logits(self, features: torch.Tensor, task: int) -> torch.Tensor:
        h = features
        for l in range(self.depth):
            h = torch.relu(F.linear(h, self.weight(l), self.bias(l))) * self.active(l, task).to(h.dtype)
        block = self.heads[task]
        return F.linear(h[:, :block.weight.shape[1]], block.weight, block.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.task_logits(features, task) for task in range(len(self.heads))], dim=1)


def soft_threshold_(tensor: torch.Tensor, threshold: float, mask: torch.Tensor | None = None) -> None:
    """Proximal step of threshold * ||.||_1: shrink toward 0 by ``threshold`` (only where ``mask``)."""
    shrunk = tensor.sign() * (tensor.abs() - threshold).clamp_min(0)
    tensor.copy_(shrunk if mask is None else torch.where(mask, shrunk, tensor))


def group_soft_threshold_(rows: torch.Tensor, threshold: float) -> torch.Tensor:
    """Proximal step of threshold * sum_g ||row_g||_2 (group lasso, one group per row); returns row norms."""
    norms = rows.norm(dim=1, keepdim=True)
    rows.mul_((1 - threshold / norms.clamp_min(1e-12)).clamp_min(0))
    return rows.norm(dim=1)


class DEN(Method):
    name = "den"
    needs_task_id = True

    @dataclass
    class Params:
        # Values of the DEN reference code's flags, jaehong31/DEN DEN_run.py:10-21 (its MNIST network).
        hidden: list[int] = field(default_factory=lambda: [312, 128])  # dims [784, 312, 128, 10], DEN_run.py:13
        epochs: int = 30  # per phase, over the task's cached features (our choice)
        batch_size: int = 256  # batch_size, DEN_run.py:11
        lr: float = 1e-3  # Adam, lr, DEN_run.py:10
        l1_lambda: float = 1e-5  # l1_lambda, DEN_run.py:15
        l2_lambda: float = 1e-4  # l2_lambda, DEN_run.py:16: selective retraining
        gl_lambda: float = 1e-3  # gl_lambda, DEN_run.py:17: group lasso on expanded units
        loss_threshold: float = 1e-2  # loss_thr, DEN_run.py:20: expand when the loss stays above it
        expand_units: int = 10  # ex_k, DEN_run.py:19: units added per hidden layer
        split_threshold: float = 0.05  # spl_thr, DEN_run.py:21: drift above which a unit is split

        def __post_init__(self):
            require_positive(self, "batch_size")

    def __init__(self, params, config):
        super().__init__(params, config)
        self.history: list[dict] = []

    def grow(self, model, ctx: TaskContext) -> None:
        if isinstance(model.head, DENNetwork):
            return
        network = DENNetwork(model.head.in_features, self.params.hidden)
        for size in model.head.task_sizes:
            network.add_task(size)
        model.head = network.to(next(model.backbone.parameters()).device)

    def train_epochs(self, ctx: TaskContext) -> int:
        return 0  # all training happens on cached features in after_training

    def before_task(self, model, ctx: TaskContext) -> None:
        model.backbone.requires_grad_(False)

    # -- one training phase -------------------------------------------------------------------------
    def fit(self, network: DENNetwork, features, targets, task: int, trainable: dict[str, torch.Tensor],
            proximal=None, penalty=None) -> None:
        """Adam on the named parameters of ``network``, each limited to its mask; ``proximal(lr)`` after every
        step; ``penalty()`` added to the loss."""
        named = dict(network.named_parameters())
        params = [named[name] for name in trainable]
        optimizer = torch.optim.Adam(params, lr=self.params.lr)
        generator = torch.Generator(device=features.device).manual_seed(self.config.train.seed * 1_000 + task)
        for epoch in range(self.params.epochs):
            order = torch.randperm(len(features), generator=generator, device=features.device)
            for step, start in enumerate(range(0, len(order), self.params.batch_size)):
                batch = order[start:start + self.params.batch_size]
                loss = F.cross_entropy(network.task_logits(features[batch], task), targets[batch])
                if penalty is not None:
                    loss = loss + penalty()
                ensure_finite_loss(loss, "den network", task, epoch, step, hint=" (lower method.params.lr?)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for name, p in zip(trainable, params):
                    if p.grad is not None:
                        p.grad.mul_(trainable[name].to(p.grad.dtype))
                optimizer.step()  # a fresh Adam never moves entries whose gradient was always 0
                if proximal is not None:
                    with torch.no_grad():
                        proximal(self.params.lr)

    @torch.no_grad()
    def task_loss(self, network: DENNetwork, features, targets, task: int) -> float:
        return F.cross_entropy(network.task_logits(features, task), targets).item()

    # -- the task -------------------------------------------------------------------------------------
    def after_training(self, model, ctx: TaskContext) -> None:
        classes = ctx.scenario.task_classes(ctx.task)
        with ctx.timer("den"):
            features, labels, _ = ctx.gather_features(classes, "train")
            network = model.head
            network.requires_grad_(True)
            with torch.enable_grad():
                record = self.learn_task(network, features, labels - classes[0], ctx.task)
        self.history.append(record)

    def learn_task(self, network: DENNetwork, features, targets, task: int) -> dict:
        p = self.params
        depth = network.depth
        block = network.heads[task]
        head_names = [f"heads.{task}.weight", f"heads.{task}.bias"]
        ones = {name: torch.ones_like(dict(network.named_parameters())[name], dtype=torch.bool) for name in head_names}
        record = {"task": task, "selected": [], "added": [0] * depth, "pruned": [0] * depth, "split": [0] * depth}
        if task == 0:
            everything = {name: torch.ones_like(t, dtype=torch.bool) for name, t in network.named_parameters()
                          if not name.startswith("heads.") or name in head_names}

            def l1_everywhere(lr):
                for l in range(depth):
                    soft_threshold_(network.weight(l).data, lr * p.l1_lambda)
                soft_threshold_(block.weight.data, lr * p.l1_lambda)

            self.fit(network, features, targets, task, everything, proximal=l1_everywhere)
            record["loss"] = self.task_loss(network, features, targets, task)
            return self.finish(network, record, task)

        previous = [(network.weight(l).detach().clone(), network.bias(l).detach().clone()) for l in range(depth)]
        # (a) selective retraining: the new output block alone with L1, then the sub-network it reaches.
        self.fit(network, features, targets, task, ones,
                 proximal=lambda lr: soft_threshold_(block.weight.data, lr * p.l1_lambda))
        selected = self.breadth_first_search(network, task)
        record["selected"] = [int(s.sum()) for s in selected]
        masks = dict(ones)
        for l in range(depth):
            inputs = torch.ones(network.weight(l).shape[1], dtype=torch.bool, device=selected[l].device) if l == 0 \
                else network.active(l - 1, task)
            masks[f"weight_{l}"] = selected[l][:, None] & inputs[None, :]
            masks[f"bias_{l}"] = selected[l]

        def l2_on_selected():
            return p.l2_lambda * sum((network.weight(l)[masks[f"weight_{l}"]] ** 2).sum() for l in range(depth))

        self.fit(network, features, targets, task, masks, penalty=l2_on_selected)
        record["loss_after_retraining"] = self.task_loss(network, features, targets, task)
        # (b) dynamic expansion
        record["expanded"] = record["loss_after_retraining"] > p.loss_threshold
        if record["expanded"] and p.expand_units > 0:
            self.expand(network, features, targets, task, record)
        # (c) split units that drifted
        for l in range(depth):
            old_row, old_bias = previous[l]
            candidates = torch.nonzero(selected[l][:old_row.shape[0]] & (network.born(l)[:old_row.shape[0]] < task))
            for unit in candidates.flatten().tolist():
                drift = (network.weight(l)[unit, :old_row.shape[1]] - old_row[unit]).norm().item()
                if drift > p.split_threshold:
                    network.split_unit(l, unit, old_row[unit], old_bias[unit], task)
                    record["split"][l] += 1
        record["loss"] = self.task_loss(network, features, targets, task)
        return self.finish(network, record, task)

    @staticmethod
    def breadth_first_search(network: DENNetwork, task: int) -> list[torch.Tensor]:
        """Units (per hidden layer) reachable from the task's output units through non-zero weights, among the
        units active for the task."""
        reached = (network.heads[task].weight.detach() != 0).any(dim=0)
        width = network.width(network.depth - 1)
        current = torch.zeros(width, dtype=torch.bool, device=reached.device)
        current[:reached.numel()] = reached
        selected = [None] * network.depth
        for l in reversed(range(network.depth)):
            current = current & network.active(l, task)
            selected[l] = current
            if l > 0:
                current = (network.weight(l).detach()[current] != 0).any(dim=0)
        return selected

    def expand(self, network: DENNetwork, features, targets, task: int, record: dict) -> None:
        p = self.params
        depth = network.depth
        start = [network.width(l) for l in range(depth)]
        for l in range(depth):
            network.add_units(l, p.expand_units, task)
        masks = {f"heads.{task}.weight": torch.zeros_like(network.heads[task].weight, dtype=torch.bool)}
        masks[f"heads.{task}.weight"][:, start[-1]:] = True
        for l in range(depth):
            weight_mask = torch.zeros_like(network.weight(l), dtype=torch.bool)
            weight_mask[start[l]:] = True  # new units' incoming weights (from old and new units below)
            masks[f"weight_{l}"] = weight_mask
            bias_mask = torch.zeros_like(network.bias(l), dtype=torch.bool)
            bias_mask[start[l]:] = True
            masks[f"bias_{l}"] = bias_mask

        def sparse_new_units(lr):
            for l in range(depth):
                rows = network.weight(l).data[start[l]:]
                soft_threshold_(rows, lr * p.l1_lambda)
                group_soft_threshold_(rows, lr * p.gl_lambda)

        self.fit(network, features, targets, task, masks, proximal=sparse_new_units)
        for l in range(depth):
            record["added"][l] = p.expand_units
            norms = network.weight(l).detach()[start[l]:].norm(dim=1)
            useless = torch.nonzero(norms == 0).flatten() + start[l]
            if len(useless):
                network.remove_units(l, useless)
            record["pruned"][l] = len(useless)

    @staticmethod
    def finish(network: DENNetwork, record: dict, task: int) -> dict:
        record["units_in_task_network"] = [int(network.active(l, task).sum()) for l in range(network.depth)]
        record["units_total"] = [network.width(l) for l in range(network.depth)]
        return record

    def task_summary(self, model, ctx: TaskContext) -> dict:
        return dict(self.history[-1]) if self.history else {}

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])
