"""AdaptFormer's parallel MLP adapter (Chen et al., NeurIPS 2022) on the unmodified timm ViT, through forward hooks.

Each block gets ``scale * up(relu(down(x)))`` added beside its MLP, where ``x`` is the block's residual stream after
attention (before ``norm2``), as RanPAC's and APER's first-session adapter computes it
(RanPAC/RanPAC petl/vision_transformer_adapter.py:165-180 ``Block.forward``, ``ffn_option="parallel"``,
``ffn_adapter_layernorm_option="none"``). A hook on ``norm2`` keeps that input; a hook on ``mlp`` adds the
adapter's output to the MLP's, which the block then adds to the residual stream."""
from __future__ import annotations

import math

import torch
from torch import nn

from .hooked_tuner import HookedTuner


class ParallelAdapter(nn.Module):
    """down (d -> r), ReLU, dropout, up (r -> d), times a fixed scale; "lora" init: the adapter starts as zero
    (RanPAC/RanPAC petl/vision_transformer_adapter.py:63-68, 74-80)."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(torch.relu(self.down(x)))) * self.scale


class ParallelAdapters(HookedTuner):
    """One ``ParallelAdapter`` per block of ``blocks`` (timm ``Block``s with ``norm2`` and ``mlp``)."""

    def __init__(self, blocks: nn.ModuleList, dim: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.adapters = nn.ModuleList(ParallelAdapter(dim, bottleneck, scale, dropout) for _ in blocks)
        self._stream: dict[int, torch.Tensor] = {}
        for index, block in enumerate(blocks):
            self._hooks.append(block.norm2.register_forward_pre_hook(self._keep_stream(index)))
            self._hooks.append(block.mlp.register_forward_hook(self._add_adapter(index)))

    def _keep_stream(self, index: int):
        def keep(module, inputs):
            if self.enabled:  # a switched-off set (APER's pretrained branch, EASE's other tasks) keeps nothing
                self._stream[index] = inputs[0]

        return keep

    def _add_adapter(self, index: int):
        def add(module, inputs, output):
            return output + self.adapters[index](self._stream.pop(index)) if self.enabled else output

        return add
