"""CODA-Prompt (Smith et al., CVPR 2023) on a frozen timm ViT (GT-RIPL/CODA-Prompt models/zoo.py, CodaPrompt).

In blocks 0-4 the prefix is an attention-weighted sum of prompt components: weight_k = cos(q * A_k, K_k) with the
frozen query q, prompt = sum_k weight_k P_k; its first half is the key prefix and the second half the value prefix.
Each task adds pool / tasks new components (Gram-Schmidt initialised, orthogonal to the earlier ones); earlier
components are detached while a later task trains, also inside the optional orthogonality penalty (0 in the
published scripts). Recipes use CODA's quarter-cosine schedule (``train.scheduler: coda_cosine``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.prompts import PromptedViT
from .base import Method, TaskContext, require_positive


def gram_schmidt_rows(existing: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random unit rows orthogonal to each other and to the rows of ``existing`` (classical
    Gram-Schmidt with re-orthogonalisation)."""
    dim = existing.shape[1]
    if existing.shape[0] + count > dim:
        raise ConfigError(f"method.params: {existing.shape[0] + count} orthogonal components do not fit in {dim} "
                          "dimensions (lower pool_size or length)")
    basis = [row / row.norm() for row in existing.double()]
    new = []
    while len(new) < count:
        vector = torch.randn(dim, generator=generator, dtype=torch.float64)
        for _ in range(2):
            for row in basis + new:
                vector = vector - (vector @ row) * row
        if vector.norm() > 1e-6:
            new.append(vector / vector.norm())
    return torch.stack(new).to(existing.dtype)


def orthogonality_penalty(matrix: torch.Tensor) -> torch.Tensor:
    """||M M^T - I||^2 over rows (CODA's ortho_penalty)."""
    gram = matrix @ matrix.T
    return ((gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)) ** 2).mean()


class CodaLayerPrompts(nn.Module):
    def __init__(self, pool: int, length: int, dim: int):
        super().__init__()
        self.components = nn.Parameter(torch.zeros(pool, length, dim))
        self.keys = nn.Parameter(torch.zeros(pool, dim))
        self.attention = nn.Parameter(torch.zeros(pool, dim))


class CodaPrompt(Method):
    name = "coda_prompt"

    @classmethod
    def backbone_sources(cls, params) -> tuple[str, ...]:
        return ("timm",)  # prompts enter timm's blocks (prompts.PromptedViT)

    @dataclass
    class Params:
        layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # e_layers, models/zoo.py CodaPrompt
        # --prompt_param 100 8 0.0 = pool, length, ortho_mu (experiments/cifar-100.sh:29, imagenet-r.sh)
        pool_size: int = 100
        length: int = 8
        ortho_mu: float = 0.0

        def __post_init__(self):
            require_positive(self, "pool_size", "length")

    def __init__(self, params, config):
        super().__init__(params, config)
        self.prompted: PromptedViT | None = None
        self.active = (0, 0)  # component range [start, end) of the current task

    def _range(self, task: int, num_tasks: int) -> tuple[int, int]:
        per_task = self.params.pool_size // num_tasks
        return task * per_task, (task + 1) * per_task

    def grow(self, model, ctx: TaskContext) -> None:
        p = self.params
        if p.pool_size < ctx.scenario.num_tasks or p.length % 2:
            raise ConfigError(f"method.params: pool_size ({p.pool_size}) must be >= the {ctx.scenario.num_tasks} "
                              f"tasks and length ({p.length}) even (half key, half value)")
        dim = model.backbone.num_features
        if self.prompted is None:
            model.prompts = nn.ModuleList([CodaLayerPrompts(p.pool_size, p.length, dim) for _ in p.layers])
            model.prompts.to(next(model.backbone.parameters()).device)
            self.prompted = PromptedViT(model.backbone, prefix_layers=p.layers)
            model.feature_fn = lambda images: self.prompted_features(model, images)
        start, end = self._range(ctx.task, ctx.scenario.num_tasks)
        generator = torch.Generator().manual_seed(self.config.train.seed * 1_000 + ctx.task)
        with torch.no_grad():  # new components, keys and attention vectors orthogonal to the earlier ones
            for layer in model.prompts:
                flat = layer.components.flatten(1)
                flat[start:end] = gram_schmidt_rows(flat[:start].cpu(), end - start, generator).to(flat)
                layer.keys[start:end] = gram_schmidt_rows(layer.keys[:start].cpu(), end - start, generator).to(flat)
                layer.attention[start:end] = gram_schmidt_rows(layer.attention[:start].cpu(), end - start,
                                                               generator).to(flat)
        self.active = (start, end)

    def _visible(self, tensor: torch.Tensor) -> torch.Tensor:
        """Components 0..end of the current task, earlier tasks' detached (GT-RIPL/CODA-Prompt models/zoo.py:149-161;
        the same slice at test, :158-161, where nothing trains)."""
        start, end = self.active
        return torch.cat([tensor[:start].detach(), tensor[start:end]])

    def _layer_prompt(self, layer: CodaLayerPrompts, query: torch.Tensor) -> torch.Tensor:
        keys, attention, components = (self._visible(t) for t in (layer.keys, layer.attention, layer.components))
        attended = F.normalize(query[:, None, :] * attention[None], dim=2)  # [B, k, d]
        weights = (attended * F.normalize(keys, dim=1)[None]).sum(dim=2)  # cosine, [B, k]
        return torch.einsum("bk,kld->bld", weights, components)

    def prompted_features(self, model, images: torch.Tensor) -> torch.Tensor:
        query = self.prompted.query(images)
        half = self.params.length // 2
        prefixes = {}
        for index, layer in zip(self.params.layers, model.prompts):
            prompt = self._layer_prompt(layer, query)
            prefixes[index] = (prompt[:, :half], prompt[:, half:])
        with self.prompted.prompted(prefixes=prefixes):
            return model.backbone(images)

    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        model.backbone.requires_grad_(False)
        model.prompts.requires_grad_(True)
        self.active = self._range(ctx.task, ctx.scenario.num_tasks)

    def training_loss(self, model, images, labels, ctx: TaskContext) -> torch.Tensor:
        loss = super().training_loss(model, images, labels, ctx)
        if self.params.ortho_mu > 0:  # on the detached-earlier slices, as zoo.py:179-182: old components stay put
            for layer in model.prompts:
                keys, attention, components = (self._visible(t) for t in (layer.keys, layer.attention,
                                                                           layer.components))
                loss = loss + self.params.ortho_mu * (
                    orthogonality_penalty(keys) + orthogonality_penalty(attention)
                    + orthogonality_penalty(components.flatten(1)))
        return loss
