"""L2P: Learning to Prompt (Wang et al., CVPR 2022), on a frozen timm ViT (google-research/l2p, the official JAX
code; JH-LEE-KR/l2p-pytorch, its PyTorch port).

A pool of prompts with learnable keys; the query is the frozen ViT's own CLS feature without prompts; the top-k
prompts by cosine similarity are prepended to the patch tokens (prompt-tuning at layer 0) and the classifier reads
the mean of the output tokens at the prompt positions. Loss: cross-entropy on the current task's classes (the
train-time mask) minus ``pull_coeff`` x the mean cosine between the selected keys and the queries.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.prompts import PromptedViT
from .base import Method, TaskContext, require_positive


def select_top_k(query: torch.Tensor, keys: torch.Tensor, top_k: int, batchwise: bool) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """Indices [B, top_k] of the keys most cosine-similar to each query, and the similarity matrix [B, pool].
    ``batchwise``: every sample uses the top_k ids chosen most often in the batch (ties: lower id first)."""
    similarity = F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T
    chosen = similarity.topk(top_k, dim=1).indices
    if batchwise:
        counts = torch.bincount(chosen.flatten(), minlength=keys.shape[0])
        order = sorted(range(keys.shape[0]), key=lambda i: (-int(counts[i]), i))[:top_k]
        chosen = torch.tensor(order, device=query.device).expand(query.shape[0], -1)
    return chosen, similarity


class PromptPool(nn.Module):
    def __init__(self, pool_size: int, length: int, dim: int, init_range: tuple[float, float]):
        super().__init__()
        low, high = init_range
        self.prompts = nn.Parameter(torch.empty(pool_size, length, dim).uniform_(low, high))
        self.keys = nn.Parameter(torch.empty(pool_size, dim).uniform_(low, high))


class L2P(Method):
    name = "l2p"
    ddp_find_unused_parameters = True  # prompts not selected in a step get no gradient

    @classmethod
    def backbone_sources(cls, params) -> tuple[str, ...]:
        return ("timm",)  # prompts enter timm's blocks (prompts.PromptedViT)

    # Defaults: the official JAX config, google-research/l2p configs/cifar100_l2p.py (the PyTorch port
    # JH-LEE-KR/l2p-pytorch configs/cifar100_l2p.py differs where noted).
    @dataclass
    class Params:
        pool_size: int = 10  # cifar100_l2p.py:99
        length: int = 10  # :100 (port: 5)
        top_k: int = 4  # :101 (port: 5)
        pull_coeff: float = 1.0  # :122 (port: 0.1)
        batchwise_prompt: bool = True  # :109, at train and test
        # Prompts and keys ~ U[low, high): flax nn.initializers.uniform() = U[0, 0.01) in the JAX code
        # (models/prompt.py:137 prompt_init, :197-198 prompt_key_init "uniform"); the port uses U(-1, 1)
        # (l2p-pytorch prompt.py:35, :60) together with its other values.
        prompt_init_range: list[float] = field(default_factory=lambda: [0.0, 0.01])
        # Batch-wise selection makes a test prediction depend on its batch: the official code evaluates each
        # task's test set separately (train_continual.py:458-473) in per-device batches of 16 (cifar100_l2p.py:25).
        test_batch_size: int = 16

        def __post_init__(self):
            require_positive(self, "pool_size", "length", "top_k", "test_batch_size")
            if self.top_k > self.pool_size:
                raise ConfigError(f"method.params.top_k: {self.top_k} prompts cannot be chosen from a pool of "
                                  f"{self.pool_size} (pool_size)")

    def __init__(self, params, config):
        super().__init__(params, config)
        self.prompted: PromptedViT | None = None
        self._pull = None

    def grow(self, model, ctx: TaskContext) -> None:
        if self.prompted is None:
            if len(self.params.prompt_init_range) != 2:
                raise ConfigError(f"method.params.prompt_init_range: expected [low, high], got "
                                  f"{self.params.prompt_init_range}")
            model.prompts = PromptPool(self.params.pool_size, self.params.length, model.backbone.num_features,
                                       tuple(self.params.prompt_init_range))
            model.prompts.to(next(model.backbone.parameters()).device)
            self.prompted = PromptedViT(model.backbone)
            model.feature_fn = lambda images: self.prompted_features(model, images)

    def prompted_features(self, model, images: torch.Tensor) -> torch.Tensor:
        query = self.prompted.query(images)
        chosen, similarity = select_top_k(query, model.prompts.keys, self.params.top_k, self.params.batchwise_prompt)
        tokens = model.prompts.prompts[chosen].flatten(1, 2)  # [B, top_k * length, dim]
        with self.prompted.prompted(tokens=tokens):
            output = model.backbone.forward_features(images)
        self._pull = similarity.gather(1, chosen).sum() / images.shape[0]  # reduce_sim of the reference
        return output[:, : tokens.shape[1]].mean(dim=1)

    def evaluation_batch(self) -> int | None:
        return self.params.test_batch_size if self.params.batchwise_prompt else None

    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        model.backbone.requires_grad_(False)  # blocks, patch_embed, cls_token, norm, pos_embed frozen
        model.prompts.requires_grad_(True)

    def training_loss(self, model, images, labels, ctx: TaskContext) -> torch.Tensor:
        loss = super().training_loss(model, images, labels, ctx)
        return loss - self.params.pull_coeff * self._pull
