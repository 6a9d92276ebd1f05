"""APER / ADAM: Adapt and Merge (Zhou et al., IJCV 2024), its adapter, SSF and VPT variants, as
zhoudw-zdw/RevisitingCIL models/aper_adapter.py, aper_ssf.py and aper_vpt.py do it.

On the first task, the variant's module on the frozen ViT and a cosine head train (``FirstSessionAdaptation``,
aper_adapter.py:96-113, aper_ssf.py:94-128, aper_vpt.py:98-121); the adapted model is then frozen. Every image's
feature is the concatenation of the pretrained ViT's and the adapted ViT's (utils/inc_net.py:620-621, 627-647: the
same ViT with its module switched off, then on). Each class's prototype is the mean of its training images'
concatenated features under the test transform (aper_adapter.py:39-64, 82-83, 116), and a test image goes to the most
cosine-similar prototype (the ``CosineLinear`` head, utils/inc_net.py:607). Prototype sums and counts are reduced over
processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import TaskContext
from .first_session import FirstSessionAdaptation, check_first_session
from .prototypes import class_means, cosine_logits


class APER(FirstSessionAdaptation):
    name = "aper"

    @dataclass
    class Params:
        # adapter, ssf, vpt_deep, vpt_shallow: exps/aper_adapter, aper_ssf, aper_vpt-deep, aper_vpt-shallow/*.json;
        # none: no adaptation, prototypes of the pretrained ViT (SimpleCIL)
        first_session: str = "adapter"
        adapter_bottleneck: int = 64  # ffn_num (exps/aper_adapter/*.json)
        adapter_scale: float = 0.1  # ffn_adapter_scalar "0.1" (utils/inc_net.py:105)
        adapter_dropout: float = 0.1  # after the ReLU, training only (convs/vision_transformer_adapter.py:77, 159)
        prompt_tokens: int = 5  # prompt_token_num (exps/aper_vpt-deep/*.json; utils/inc_net.py:84)
        prototype_batch_size: int = 128  # images per forward pass for the prototypes (no effect on results)

        def __post_init__(self):
            check_first_session(self)

    def __init__(self, params, config):
        super().__init__(params, config)
        self.prototypes: torch.Tensor | None = None  # [seen, 2d] (or [seen, d] without adaptation), float32

    def features(self, model, images: torch.Tensor) -> torch.Tensor:
        """[pretrained ViT's feature, adapted ViT's feature] (utils/inc_net.py:620-621, 647)."""
        if not self.adapts_first_session:
            return model.features(images).float()
        with model.first_session_tuner.disabled():
            pretrained = model.features(images).float()
        return torch.cat([pretrained, model.features(images).float()], dim=1)

    @torch.no_grad()
    def after_training(self, model, ctx: TaskContext) -> None:
        classes = ctx.scenario.task_classes(ctx.task)
        with ctx.timer("statistics"):
            model.eval()  # as for every statistic (the trainer's extract_features); the next epoch sets train()
            batches = ((self.features(model, images), labels)
                       for images, labels in ctx.iterate_images(classes, "train", self.params.prototype_batch_size))
            width = model.backbone.num_features * (2 if self.adapts_first_session else 1)
            means = class_means(batches, classes, width, ctx)
        self.prototypes = means if self.prototypes is None else torch.cat([self.prototypes, means])

    def predict(self, model, images: torch.Tensor, ctx: TaskContext) -> torch.Tensor:
        """Cosine similarity to each prototype (``CosineLinear`` with its untrained scale 1)."""
        return cosine_logits(self.features(model, images), self.prototypes)

    def state_dict(self) -> dict:
        return {"prototypes": self.prototypes}

    def load_state_dict(self, state: dict) -> None:
        self.prototypes = state.get("prototypes")
