"""The trained model: an unmodified timm or transformers backbone plus the incremental head."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import AdapterConfig, BackboneConfig
from .adapters import attach_adapter
from .backbone import create_backbone
from .heads import IncrementalHead


class ContinualModel(nn.Module):
    def __init__(self, backbone: nn.Module, adapter_parameter_names: set[str] | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = IncrementalHead(backbone.num_features)
        self.adapter_parameter_names = adapter_parameter_names or set()  # names within ``backbone``
        # A method may replace how features are computed (prompts), keeping forward() as the one entry point that
        # DDP wraps: set by the method, called as feature_fn(images).
        self.feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-logits feature (CLS token after the final norm for timm ViTs built with num_classes=0). A 2-D input
        is already that feature (a batch of ``train.feature_cache``) and is returned as it is."""
        if images.dim() == 2:
            return images
        if self.feature_fn is not None:
            return self.feature_fn(images)
        return self.backbone(images)

    def forward(self, images: torch.Tensor, extra_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``images``; ``extra_features`` (generated replay features) are appended after the images'
        features, so that they reach the head through the same (DDP-wrapped) call."""
        features = self.features(images)
        if extra_features is not None:
            features = torch.cat([features, extra_features.to(features.dtype)])
        return self.head(features)


def build_model(cfg: BackboneConfig, adapter: AdapterConfig | None = None) -> ContinualModel:
    backbone = create_backbone(cfg)
    names = attach_adapter(backbone, adapter) if adapter is not None and adapter.type else set()
    return ContinualModel(backbone, names)
