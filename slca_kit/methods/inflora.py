"""InfLoRA (Liang & Li, CVPR 2024), a LoRA baseline (liangyanshuo/InfLoRA methods/inflora.py, models/sinet_inflora.py).

Each task adds a LoRA branch to the K and V parts of every block's ``qkv``: ``W_kv + B_t A_t``. A_t (rank 10) is
designed, not trained: the top-r eigenvectors of the task's input covariance after projecting off the subspace
that DualGPM keeps for earlier tasks, divided by sqrt(3). Only B_t (initialised at 0) and the task's head train;
the backbone and earlier branches are frozen. After each task DualGPM grows that subspace with the task's inputs
(energy threshold (lame - lamb) t / T + lamb). The branches wrap timm's ``qkv`` Linear; the ViT is not forked.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import Method, TaskContext, require_positive


class InfLoRAQKV(nn.Module):
    """timm's fused qkv Linear plus per-task low-rank updates of its K and V outputs."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.dim = base.in_features
        self.down = nn.ParameterList()  # A_t, [2, r, d]: designed, frozen (k and v)
        self.up = nn.ParameterList()  # B_t, [2, d, r]: trained for task t only

    def add_task(self, rank: int) -> None:
        device = self.base.weight.device
        self.down.append(nn.Parameter(torch.zeros(2, rank, self.dim, device=device), requires_grad=False))
        self.up.append(nn.Parameter(torch.zeros(2, self.dim, rank, device=device)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not len(self.down):
            return out
        delta = sum(torch.einsum("...i,kri,kor->k...o", x, down.to(x.dtype), up.to(x.dtype))
                    for down, up in zip(self.down, self.up))
        zeros = torch.zeros_like(out[..., : self.dim])
        return out + torch.cat([zeros, delta[0], delta[1]], dim=-1)


class DualGPM:
    """The subspace of earlier tasks' layer inputs (Saha et al. 2021, dual form as in InfLoRA): stores an
    orthonormal basis of the subspace while it is at most half the dimension ("remove"), else of its orthogonal
    complement ("retain"). It works on the input covariance C (d x d) as the official code does, and measures
    energy by the SQUARED singular values of C (liangyanshuo/InfLoRA methods/inflora.py:321-411, ``S**2``)."""

    def __init__(self, dim: int):
        self.dim = dim
        self.basis = torch.zeros(dim, 0, dtype=torch.float64)
        self.mode = "remove"

    def projector(self) -> torch.Tensor:
        """P: the orthogonal projector onto the stored earlier-task subspace."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        outer = self.basis @ self.basis.T
        return outer if self.mode == "remove" else eye - outer

    def project_off(self, covariance: torch.Tensor) -> torch.Tensor:
        """(I - P) C: what InfLoRA decomposes to design a new task's A (inflora.py:148-153)."""
        return covariance - self.projector() @ covariance

    def update(self, covariance: torch.Tensor, threshold: float) -> int:
        """Add directions of the task's inputs until the subspace holds ``threshold`` of their energy (sum of
        squared singular values of C); returns how many were added."""
        covariance = covariance.to(torch.float64)
        total = (torch.linalg.svdvals(covariance) ** 2).sum()
        if self.basis.shape[1] == 0:  # first task (inflora.py:325-338): r = #{k: cumsum(ratio)_k < threshold}
            left, values, _ = torch.linalg.svd(covariance, full_matrices=False)
            ratios = values ** 2 / total
            added = max(int((torch.cumsum(ratios, 0) < threshold).sum()), 1)
            self.basis = left[:, :added]
        elif self.mode == "remove":  # inflora.py:341-367: grow the basis with top directions of (I - P) C
            left, values, _ = torch.linalg.svd(self.project_off(covariance), full_matrices=False)
            ratios = values ** 2 / total
            captured = 1 - ratios.sum()
            added = 0
            while added < len(ratios) and captured < threshold:
                captured += ratios[added]
                added += 1
            if added:
                self.basis = torch.cat([self.basis, left[:, :added]], dim=1)[:, : self.dim]
        else:  # retain, inflora.py:369-398: drop from the stored complement the directions that carry energy
            inside = self.basis @ self.basis.T @ covariance
            left, values, _ = torch.linalg.svd(inside, full_matrices=False)
            ratios = values ** 2 / total
            remaining = ratios.sum()
            added = 0
            while added < len(ratios) and remaining >= 1 - threshold:
                remaining -= ratios[added]
                added += 1
            if added:
                new = left[:, :added]
                shrunk = self.basis - new @ (new.T @ self.basis)
                kept = self.basis.shape[1] - added
                self.basis = torch.linalg.svd(shrunk, full_matrices=True)[0][:, :kept]
        if self.mode == "remove" and self.basis.shape[1] > self.dim / 2:  # inflora.py:402-408: store the complement
            full = torch.linalg.svd(self.basis, full_matrices=True)[0]
            self.basis, self.mode = full[:, self.basis.shape[1]:], "retain"
        return added

    def state_dict(self) -> dict:
        return {"basis": self.basis, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        self.basis, self.mode = state["basis"], state["mode"]


def design_down_projection(covariance: torch.Tensor, memory: DualGPM, rank: int) -> torch.Tensor:
    """A = top-r left singular vectors of (I - P) C, transposed, / sqrt(3) (InfLoRA's initialisation)."""
    left, _, _ = torch.linalg.svd(memory.project_off(covariance.to(torch.float64)), full_matrices=False)
    return (left[:, :rank].T / math.sqrt(3)).float()


class InfLoRA(Method):
    name = "inflora"

    @classmethod
    def backbone_sources(cls, params) -> tuple[str, ...]:
        return ("timm",)  # its branches wrap timm's blocks[i].attn.qkv

    # liangyanshuo/InfLoRA configs/cifar100_inflora.json (mimg10_inflora.json: ImageNet-R)
    @dataclass
    class Params:
        rank: int = 10  # "rank": 10
        lamb: float = 0.95  # DualGPM threshold at the first task: 0.95 CIFAR, 0.98 ImageNet-R
        lame: float = 1.0  # threshold at the last task; (lame - lamb) t / T + lamb in between (inflora.py:322)

        def __post_init__(self):
            require_positive(self, "rank")
            for name in ("lamb", "lame"):  # a share of the input energy (inflora.py:322)
                if getattr(self, name) > 1:
                    raise ConfigError(f"method.params.{name}: a threshold in [0, 1], got {getattr(self, name)}")

    def __init__(self, params, config):
        super().__init__(params, config)
        self.memories: list[DualGPM] = []  # per block: the earlier tasks' subspace of qkv inputs (K and V share it)

    @staticmethod
    def _layers(model) -> list[InfLoRAQKV]:
        return [block.attn.qkv for block in model.backbone.blocks]

    def grow(self, model, ctx: TaskContext) -> None:
        for block in model.backbone.blocks:
            if not isinstance(block.attn.qkv, InfLoRAQKV):
                block.attn.qkv = InfLoRAQKV(block.attn.qkv)
            block.attn.qkv.add_task(self.params.rank)
        if not self.memories:
            self.memories = [DualGPM(layer.dim) for layer in self._layers(model)]

    @torch.no_grad()
    def _input_covariances(self, model, ctx: TaskContext) -> list[torch.Tensor]:
        """Sum over the task's training tokens of x x^T at every qkv input, summed over processes."""
        layers = self._layers(model)
        sums = [torch.zeros(layer.dim, layer.dim, dtype=torch.float64, device=ctx.device) for layer in layers]

        def hook(index):
            def accumulate(module, inputs):
                tokens = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
                sums[index] += tokens.T @ tokens
            return accumulate

        with contextlib.ExitStack() as stack:
            for index, layer in enumerate(layers):
                stack.callback(layer.register_forward_pre_hook(hook(index)).remove)
            ctx.extract_features(ctx.scenario.task_classes(ctx.task), "train")
        return [ctx.reduce_sum(s).cpu() for s in sums]

    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        model.backbone.requires_grad_(False)
        covariances = self._input_covariances(model, ctx)
        for layer, memory, covariance in zip(self._layers(model), self.memories, covariances):
            down = design_down_projection(covariance, memory, self.params.rank)
            with torch.no_grad():
                layer.down[ctx.task].copy_(down.expand(2, -1, -1).to(layer.down[ctx.task].device))
            layer.up[ctx.task].requires_grad_(True)

    def after_training(self, model, ctx: TaskContext) -> None:
        with ctx.timer("statistics"):
            threshold = (self.params.lame - self.params.lamb) * ctx.task / ctx.scenario.num_tasks + self.params.lamb
            for memory, covariance in zip(self.memories, self._input_covariances(model, ctx)):
                memory.update(covariance, threshold)

    def state_dict(self) -> dict:
        return {"memories": [memory.state_dict() for memory in self.memories]}

    def load_state_dict(self, state: dict) -> None:
        self.memories = []
        for memory_state in state["memories"]:
            memory = DualGPM(memory_state["basis"].shape[0])
            memory.load_state_dict(memory_state)
            self.memories.append(memory)
