"""HiDe-Prompt's task-identity classifier: a residual MLP and a linear layer over every class on the frozen ViT's
pre-logits feature (thu-ml/HiDe-Prompt vits/hide_prompt_vision_transformer.py:321-369 ``MlpMapping``, :520-528,
:657-661), trained apart from the prompts."""
from __future__ import annotations

import torch
from torch import nn


class TaskIdentityHead(nn.Module):
    """``hidden`` lists the hidden widths as multiples of ``dim`` ([2]: dim -> 2 dim -> dim). Layers as
    ``MlpMapping``: Linear + GELU + Dropout, the middle one of several Linear + Dropout + LayerNorm, the last Linear +
    Dropout; the input is added back and a LayerNorm follows (fc_with_norm is false with the CLS token). Linear layers
    start as timm's ViT init (truncated normal, std 0.02, zero bias; init_weights_vit_timm :677-682)."""

    def __init__(self, dim: int, hidden: list[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        widths = [dim] + [dim * h for h in hidden] + [dim]
        layers = []
        for i in range(len(hidden) + 1):
            linear = nn.Linear(widths[i], widths[i + 1])
            if i == len(hidden):
                layers.append(nn.Sequential(linear, nn.Dropout(dropout)))
            elif i == len(hidden) // 2 and i != 0:
                layers.append(nn.Sequential(linear, nn.Dropout(dropout), nn.LayerNorm(widths[i + 1])))
            else:
                layers.append(nn.Sequential(linear, nn.GELU(), nn.Dropout(dropout)))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def mapped(self, features: torch.Tensor) -> torch.Tensor:
        out = features
        for layer in self.layers:
            out = layer(out)
        return self.norm(out + features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.mapped(features))
