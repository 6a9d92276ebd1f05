"""The incremental classifier: one linear head per task, concatenated (reference ``SimpleContinualLinear``)."""
from __future__ import annotations

import torch
from torch import nn


class IncrementalHead(nn.Module):
    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.heads = nn.ModuleList()

    def add_task(self, num_classes: int) -> nn.Linear:
        head = nn.Linear(self.in_features, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)  # reference init (slca.md, Stage 1)
        nn.init.zeros_(head.bias)
        self.heads.append(head)
        return head

    @property
    def task_sizes(self) -> list[int]:
        return [head.out_features for head in self.heads]

    @property
    def num_classes(self) -> int:
        return sum(self.task_sizes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(features) for head in self.heads], dim=1)

    def forward_fused(self, features: torch.Tensor) -> torch.Tensor:
        """The same logits as ``forward`` (GengDavid/SLCA convs/linears.py:93-100: per-block linear, then cat; up to
        float rounding: another summation order) and the same gradients, as one matmul over every task's rows when each
        block is a plain ``nn.Linear``: one [d, C] product instead of one [d, C_t] product per task, which at 200
        classes in 10 tasks takes 26 % less time a step of classifier alignment on the CPU (docs/performance.md). Blocks
        of other kinds (cosine heads) go through ``forward``."""
        blocks = list(self.heads)
        if len(blocks) < 2 or any(type(block) is not nn.Linear or block.bias is None for block in blocks):
            return self(features)
        return nn.functional.linear(features, torch.cat([block.weight for block in blocks]),
                                    torch.cat([block.bias for block in blocks]))


class CosineHead(nn.Module):
    """``sigma * cos(features, w_c)`` with a learnable scale ``sigma`` (init 1) and weights drawn from
    U(-1/sqrt(d), 1/sqrt(d)): PyCIL's ``CosineLinear`` as RanPAC trains it in its first session
    (RanPAC/RanPAC inc_net.py:9-48)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / in_features ** 0.5
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cosine = nn.functional.linear(nn.functional.normalize(features, dim=1),
                                      nn.functional.normalize(self.weight, dim=1))
        return self.sigma * cosine
