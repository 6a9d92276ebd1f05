"""AdaptFormer's parallel MLP adapter (Chen et al., NeurIPS 2022) on the unmodified timm ViT, through forward hooks.

Each block gets ``scale * up(relu(down(x)))`` added beside its MLP, where ``x`` is the block's residual stream after
attention (before ``norm2``), as RanPAC's and APER's first-session adapter computes it
(RanPAC/RanPAC petl/vision_transformer_adapter.py:165-180 ``Block.forward``, ``ffn_option="parallel"``,
``ffn_adapter_layernorm_option="none"``). A hook on ``norm2`` keeps that input; a hook on ``mlp`` adds the
adapter's output to the MLP's, which the block then adds to the residual stream."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


class ParallelAdapter(nn.Module):
    """down (d -> r), ReLU, up (r -> d), times a fixed scale; "lora" init: the adapter starts as zero
    (RanPAC/RanPAC petl/vision_transformer_adapter.py:63-68)."""

    def __init__(self, dim: int, bottleneck: int, scale: float):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x))) * self.scale


class ParallelAdapters(nn.Module):
    """One ``ParallelAdapter`` per block of ``blocks`` (timm ``Block``s with ``norm2`` and ``mlp``)."""

    def __init__(self, blocks: nn.ModuleList, dim: int, bottleneck: int, scale: float):
        super().__init__()
        self.adapters = nn.ModuleList(ParallelAdapter(dim, bottleneck, scale) for _ in blocks)
        self._stream: dict[int, torch.Tensor] = {}
        self.enabled = True  # False: the blocks compute as the pretrained ViT (APER's frozen branch)
        self._hooks = []
        for index, block in enumerate(blocks):
            self._hooks.append(block.norm2.register_forward_pre_hook(self._keep_stream(index)))
            self._hooks.append(block.mlp.register_forward_hook(self._add_adapter(index)))

    def _keep_stream(self, index: int):
        def keep(module, inputs):
            self._stream[index] = inputs[0]

        return keep

    def _add_adapter(self, index: int):
        def add(module, inputs, output):
            stream = self._stream.pop(index)
            return output + self.adapters[index](stream) if self.enabled else output

        return add

    @contextlib.contextmanager
    def disabled(self):
        """The pretrained ViT's computation inside the block, the adapters' after it."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def remove(self) -> None:
        """Detach from the ViT (the blocks compute as before)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
