"""SD-LoRA's decoupled low-rank updates (Wu et al., ICLR 2025) on the unmodified timm ViT, through a forward hook on
each block's fused ``attn.qkv`` Linear, as WuYichen-97/SD-Lora-CL backbone/lora.py ``_LoRA_qkv_timm_train``
(:132-194) computes them: every task t owns a rank-r direction B_t A_t on the query slice and one on the value slice
of every block, and one magnitude m_t shared by all of them. The hook adds, to the query and value outputs,

    sum_{i < t} m_i * B_i A_i x / (||B_i||_F ||A_i||_F)  +  m_t * B_t A_t x

(:170-188: earlier directions normalised, the current one not). Directions start as LoRA does (A Kaiming-uniform,
B zero: :378-384); magnitudes start at ``magnitude_init`` (:326-328). peft has no tuner for one magnitude shared
across layers over normalised per-task directions, hence the hook."""
from __future__ import annotations

import math

import torch
from torch import nn

from .hooked_tuner import HookedTuner

QUERY, VALUE = 0, 1


class DecoupledLoRA(HookedTuner):
    def __init__(self, blocks: nn.Sequential, magnitude_init: float):
        super().__init__()
        self.dim = blocks[0].attn.qkv.in_features
        self.layers = len(blocks)
        self.magnitude_init = magnitude_init
        self.down = nn.ParameterList()  # per task: A [layers, 2 (query, value), rank, dim]
        self.up = nn.ParameterList()  # per task: B [layers, 2, dim, rank]
        self.magnitudes = nn.ParameterList()  # per task: m, a scalar
        for layer, block in enumerate(blocks):
            self._hooks.append(block.attn.qkv.register_forward_hook(self._add_updates(layer)))

    def add_task(self, rank: int) -> None:
        """A new direction per block and slice, and a new magnitude; the earlier magnitudes restart at
        ``magnitude_init`` too, as the official code rebuilds them for every task (models/sdlora.py:109,
        lora.py:328)."""
        down = torch.empty(self.layers, 2, rank, self.dim)
        for matrix in down.view(-1, rank, self.dim):
            nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))  # nn.Linear(dim, rank)'s init (lora.py:380)
        self.down.append(nn.Parameter(down))
        self.up.append(nn.Parameter(torch.zeros(self.layers, 2, self.dim, rank)))
        self.magnitudes.append(nn.Parameter(torch.tensor(0.0)))
        with torch.no_grad():
            for magnitude in self.magnitudes:
                magnitude.fill_(self.magnitude_init)

    def update(self, layer: int, which: int, x: torch.Tensor) -> torch.Tensor:
        """The summed update of the query (``which`` 0) or value (1) slice of block ``layer`` for inputs ``x``."""
        last = len(self.down) - 1
        total = 0.0
        for task, (down, up, magnitude) in enumerate(zip(self.down, self.up, self.magnitudes)):
            a, b = down[layer, which].to(x.dtype), up[layer, which].to(x.dtype)
            low_rank = (x @ a.T) @ b.T
            if task < last:
                low_rank = low_rank / (torch.linalg.matrix_norm(b) * torch.linalg.matrix_norm(a))
            total = total + magnitude * low_rank
        return total

    def _add_updates(self, layer: int):
        def add(module, inputs, output):
            if not self.enabled or not len(self.down):
                return None
            x = inputs[0]
            query = self.update(layer, QUERY, x)
            value = self.update(layer, VALUE, x)
            zeros = torch.zeros_like(query)
            return output + torch.cat([query, zeros, value], dim=-1)

        return add
