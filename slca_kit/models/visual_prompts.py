"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022) on the unmodified timm ViT, through forward hooks, as RanPAC's
and APER's VPT ViT computes it (RanPAC/RanPAC petl/vpt.py; zhoudw-zdw/RevisitingCIL convs/vpt.py is the same):
learnable tokens, initialised to zero (vpt.py:50-53), are appended after the class and patch tokens and dropped
again. Deep: a fresh set before every block, dropped after it (vpt.py:104-116); shallow: one set before the first
block, dropped after the last (vpt.py:118-126)."""
from __future__ import annotations

import torch
from torch import nn

from .hooked_tuner import HookedTuner


class VisualPrompts(HookedTuner):
    def __init__(self, blocks: nn.Sequential, dim: int, tokens: int, deep: bool):
        super().__init__()
        self.prompts = nn.Parameter(torch.zeros(len(blocks) if deep else 1, tokens, dim))
        entries = list(range(len(blocks))) if deep else [0]
        exits = entries if deep else [len(blocks) - 1]
        for layer, index in enumerate(entries):
            self._hooks.append(blocks[index].register_forward_pre_hook(self._append(layer)))
        for index in exits:
            self._hooks.append(blocks[index].register_forward_hook(self._drop))

    def _append(self, layer: int):
        def append(module, inputs):
            if not self.enabled:
                return None
            x = inputs[0]
            prompts = self.prompts[layer].to(x.dtype).expand(x.shape[0], -1, -1)
            return (torch.cat([x, prompts], dim=1), *inputs[1:])

        return append

    def _drop(self, module, inputs, output):
        return output[:, : output.shape[1] - self.prompts.shape[1]] if self.enabled else None
