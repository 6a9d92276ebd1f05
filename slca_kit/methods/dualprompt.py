"""DualPrompt (Wang et al., ECCV 2022) on a frozen timm ViT (JH-LEE-KR/dualprompt-pytorch, the PyTorch port the
SLCA paper compares with; google-research/l2p configs/*_dualprompt.py, the JAX original, has the same values).

A shared G-prompt (prefix-tuning in blocks 0-1) and a pool of task E-prompts (prefix-tuning in blocks 2-4), each
prompt holding a key half and a value half. Training uses the E-prompt of the task id and pulls its key toward the
frozen query; testing picks the E-prompt whose key best matches the query. A task's E-prompt starts as a copy of
the previous task's. The classifier reads the CLS output.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.prompts import PromptedViT
from .base import Method, TaskContext, require_positive
from .l2p import select_top_k


class DualPrompts(nn.Module):
    def __init__(self, g_layers: int, e_layers: int, pool: int, g_length: int, e_length: int, dim: int):
        super().__init__()
        # (layers, 2 = key/value, length, dim) and (layers, 2, pool, length, dim); U(-1, 1) for prompts and keys
        # as the port (JH-LEE-KR/dualprompt-pytorch prompt.py:35, :60; configs prompt_key_init 'uniform')
        self.g = nn.Parameter(torch.empty(g_layers, 2, g_length, dim).uniform_(-1, 1))
        self.e = nn.Parameter(torch.empty(e_layers, 2, pool, e_length, dim).uniform_(-1, 1))
        self.e_keys = nn.Parameter(torch.empty(pool, dim).uniform_(-1, 1))


class DualPrompt(Method):
    name = "dualprompt"
    ddp_find_unused_parameters = True  # other tasks' E-prompts get no gradient

    @classmethod
    def backbone_sources(cls, params) -> tuple[str, ...]:
        return ("timm",)  # prompts enter timm's blocks (prompts.PromptedViT)

    # Defaults: JH-LEE-KR/dualprompt-pytorch configs/cifar100_dualprompt.py (imr_dualprompt.py where noted).
    @dataclass
    class Params:
        g_layers: list[int] = field(default_factory=lambda: [0, 1])  # g_prompt_layer_idx
        g_length: int = 5  # :79
        e_layers: list[int] = field(default_factory=lambda: [2, 3, 4])  # e_prompt_layer_idx
        e_pool_size: int = 10  # :90 --size
        e_length: int = 5  # :91; ImageNet-R 20 (imr_dualprompt.py:91)
        pull_coeff: float = 1.0  # :104
        # Test-time E-prompt choice: True = the id most often matched in the batch (CIFAR, :100), False = per
        # sample (ImageNet-R, imr_dualprompt.py:100). Batch-wise, the official code evaluates each task's test set
        # separately (engine.py:150-152) in batches of --batch-size 24 (:4, datasets.py:94-97).
        batchwise_prompt: bool = True
        test_batch_size: int = 24

        def __post_init__(self):
            require_positive(self, "e_pool_size", "e_length", "test_batch_size")

    def __init__(self, params, config):
        super().__init__(params, config)
        self.prompted: PromptedViT | None = None
        self._pull = None
        self._task_for_training = 0  # the E-prompt trained now (set in before_task)

    def grow(self, model, ctx: TaskContext) -> None:
        if self.params.e_pool_size < ctx.scenario.num_tasks:
            raise ConfigError(f"method.params.e_pool_size: {self.params.e_pool_size} E-prompts for "
                              f"{ctx.scenario.num_tasks} tasks; need at least one per task")
        if self.prompted is None:
            p = self.params
            model.prompts = DualPrompts(len(p.g_layers), len(p.e_layers), p.e_pool_size, p.g_length, p.e_length,
                                        model.backbone.num_features).to(next(model.backbone.parameters()).device)
            self.prompted = PromptedViT(model.backbone, prefix_layers=sorted(set(p.g_layers) | set(p.e_layers)))
            model.feature_fn = lambda images: self.prompted_features(model, images)

    def match(self, model, query: torch.Tensor) -> torch.Tensor:
        """Test-time E-prompt ids: the key most cosine-similar to each query, or with ``batchwise_prompt`` the id
        matched most often in the batch (prompt.py:97-111)."""
        chosen, _ = select_top_k(query, model.prompts.e_keys, 1, self.params.batchwise_prompt)
        return chosen[:, 0]

    def evaluation_batch(self) -> int | None:
        return self.params.test_batch_size if self.params.batchwise_prompt else None

    def prompted_features(self, model, images: torch.Tensor) -> torch.Tensor:
        prompts = model.prompts
        query = self.prompted.query(images)
        if model.training:  # the task id picks the E-prompt (use_prompt_mask)
            ids = torch.full((images.shape[0],), self._task_for_training, device=images.device)
            self._pull = F.cosine_similarity(prompts.e_keys[ids], query, dim=1).mean()
        else:
            ids = self.match(model, query)
        batch = images.shape[0]
        prefixes = {}
        for i, layer in enumerate(self.params.g_layers):
            g = prompts.g[i]  # [2, length, dim]
            prefixes[layer] = (g[0].expand(batch, -1, -1), g[1].expand(batch, -1, -1))
        for i, layer in enumerate(self.params.e_layers):
            e = prompts.e[i][:, ids]  # [2, B, length, dim]
            key, value = e[0], e[1]
            if layer in prefixes:  # G and E at the same block: concatenated
                key, value = torch.cat([prefixes[layer][0], key], 1), torch.cat([prefixes[layer][1], value], 1)
            prefixes[layer] = (key, value)
        with self.prompted.prompted(prefixes=prefixes):
            return model.backbone(images)

    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        self._task_for_training = ctx.task
        model.backbone.requires_grad_(False)
        model.prompts.requires_grad_(True)
        if ctx.task > 0:  # E-prompt of task t starts from task t-1's (shared_prompt_pool in the port)
            with torch.no_grad():
                model.prompts.e[:, :, ctx.task] = model.prompts.e[:, :, ctx.task - 1]

    def training_loss(self, model, images, labels, ctx: TaskContext) -> torch.Tensor:
        loss = super().training_loss(model, images, labels, ctx)
        return loss - self.params.pull_coeff * self._pull
