"""EASE: Expandable Subspace Ensemble (Zhou et al., CVPR 2024), as sun-hailong/CVPR24-Ease models/ease.py does it.

Every task adds a set of AdaptFormer adapters (one per block, parallel to the MLP) to the frozen ViT
(backbone/vit_ease.py:285-302); they and a cosine head over the task's classes train on the task alone, with
cross-entropy on its classes (ease.py:325-335, utils/inc_net.py:142-171), then freeze (ease.py:44-46). Each adapter
set spans a feature subspace: the ViT run with set s gives subspace s. After training, each new class's prototype in
every subspace so far is the mean of its training images' features under the test transform (ease.py:60-98, 251). Old
classes have no data for the new subspace; their prototypes there are synthesised from the new classes'
(``complement_prototypes``, ease.py:127-128, 176-226). A test image is classified by cosine similarity to the
prototypes in every subspace, the class's own task's subspace at weight 1 and the others at ``alpha / task``
(``reweighted_logits``, backbone/linears.py:45-93). Prototype sums and counts are reduced over processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.heads import CosineHead
from ..models.parallel_adapter import ParallelAdapters
from .base import Method, TaskContext
from .prototypes import class_means


def complement_prototypes(weight: torch.Tensor, task_rows: list[slice], dim: int, first_block: int) -> torch.Tensor:
    """Semantic-guided prototype complement (ease.py:176-226, ``solve_sim_reset``). ``weight`` [classes, blocks * dim]
    holds real prototypes for every task's classes in the blocks of its own subspace and the earlier ones; task k's
    own block is ``k + first_block``. For an old task a and each later subspace b, its classes' prototypes in b are
    the later classes' (tasks b ... last) prototypes in b, weighted by the softmax over those classes of the cosine
    similarity in a's own subspace. Returns a new tensor."""
    weight = weight.clone()
    last = len(task_rows) - 1

    def block(task: int) -> slice:
        return slice((task + first_block) * dim, (task + first_block + 1) * dim)

    for old in range(last):
        for later in range(old + 1, last + 1):
            later_rows = slice(task_rows[later].start, task_rows[last].stop)
            similarity = (F.normalize(weight[task_rows[old], block(old)], dim=1)
                          @ F.normalize(weight[later_rows, block(old)], dim=1).T)
            weight[task_rows[old], block(later)] = similarity.softmax(dim=1) @ weight[later_rows, block(later)]
    return weight


def reweighted_logits(features: torch.Tensor, weight: torch.Tensor, task_rows: list[slice], dim: int, alpha: float,
                      beta: float, use_pretrained: bool) -> torch.Tensor:
    """``CosineLinear.forward_reweight`` (backbone/linears.py:45-93): per task i's classes, the sum over blocks j of
    cos(feature_j, prototype_j), weighted 1 in i's own block, ``alpha / task`` in other adapters' blocks and
    ``beta`` in the pretrained ViT's block (block 0 with ``use_pretrained``); ``task`` is the last task's index.
    The head's sigma stays at its initial 1 (the merged head never trains)."""
    task = len(task_rows) - 1
    first_block = 1 if use_pretrained else 0
    logits = []
    for index, rows in enumerate(task_rows):
        out = 0.0
        for j in range(weight.shape[1] // dim):
            cosine = F.normalize(features[:, j * dim:(j + 1) * dim], dim=1) @ F.normalize(
                weight[rows, j * dim:(j + 1) * dim], dim=1).T
            if use_pretrained and j == 0:
                out = out + beta * cosine
            elif j == index + first_block:
                out = out + cosine
            else:
                out = out + alpha * cosine / task
        logits.append(out)
    return torch.cat(logits, dim=1)


class EASE(Method):
    name = "ease"

    @dataclass
    class Params:
        adapter_bottleneck: int = 64  # ffn_num (exps/ease_*.json)
        adapter_scale: float = 0.1  # ffn_adapter_scalar "0.1" (utils/inc_net.py:31)
        adapter_dropout: float = 0.1  # after the ReLU, training only (backbone/vit_ease.py:77, 290)
        alpha: float = 0.1  # other subspaces' weight (exps/ease_cifar_in21k.json, ease_inr_in21k.json; CUB 0.05)
        use_init_ptm: bool = False  # add the pretrained ViT's subspace (exps/ease_*.json: false)
        beta: float = 0.0  # its weight, with use_init_ptm (exps/ease_*.json)
        prototype_batch_size: int = 128  # images per forward pass for the prototypes (no effect on results)

        def __post_init__(self):
            if min(self.adapter_bottleneck, self.adapter_scale, self.prototype_batch_size) <= 0:
                raise ConfigError("method.params.adapter_bottleneck, adapter_scale and prototype_batch_size: must "
                                  "be > 0")
            if not 0 <= self.adapter_dropout < 1:
                raise ConfigError(f"method.params.adapter_dropout: {self.adapter_dropout}; must be in [0, 1)")

    @classmethod
    def backbone_sources(cls, params) -> tuple[str, ...]:
        return ("timm",)  # the adapters hook into timm's blocks

    def __init__(self, params, config):
        super().__init__(params, config)
        self.prototypes: torch.Tensor | None = None  # [seen, blocks * d] float32: the merged head's weight

    def grow(self, model, ctx: TaskContext) -> None:
        dim = model.backbone.num_features
        device = next(model.backbone.parameters()).device
        if not hasattr(model, "ease_adapters"):
            model.ease_adapters = nn.ModuleList()
        p = self.params
        model.ease_adapters.append(ParallelAdapters(model.backbone.blocks, dim, p.adapter_bottleneck, p.adapter_scale,
                                                    p.adapter_dropout).to(device))
        # the task's "proxy" head is PyCIL's cosine head (utils/inc_net.py:142-148)
        model.head.heads[ctx.task] = CosineHead(dim, ctx.scenario.task_sizes[ctx.task]).to(device)

    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        model.backbone.requires_grad_(False)
        for index, adapters in enumerate(model.ease_adapters):  # only the new set trains (ease.py:44-46)
            adapters.requires_grad_(index == ctx.task)
        self._use_adapters(model, ctx.task)

    @staticmethod
    def _use_adapters(model, index: int | None) -> None:
        """Run the ViT with adapter set ``index`` (None: the pretrained ViT)."""
        for position, adapters in enumerate(model.ease_adapters):
            adapters.enabled = position == index

    def _subspace_features(self, model, images: torch.Tensor, task: int) -> torch.Tensor:
        """[pretrained ViT (with use_init_ptm), adapter set 0, ..., adapter set ``task``] features
        (vit_ease.py:330-377 ``forward_test``), float32."""
        indices = ([None] if self.params.use_init_ptm else []) + list(range(task + 1))
        features = []
        for index in indices:
            self._use_adapters(model, index)
            features.append(model.features(images).float())
        self._use_adapters(model, task)
        return torch.cat(features, dim=1)

    def _task_rows(self, ctx: TaskContext) -> list[slice]:
        scenario = ctx.scenario
        return [slice(scenario.task_offset(t), scenario.task_offset(t) + scenario.task_sizes[t])
                for t in range(ctx.task + 1)]

    @torch.no_grad()
    def after_training(self, model, ctx: TaskContext) -> None:
        classes = ctx.scenario.task_classes(ctx.task)
        dim = model.backbone.num_features
        blocks = ctx.task + 1 + int(self.params.use_init_ptm)
        with ctx.timer("statistics"):
            model.eval()  # as for every statistic (the trainer's extract_features); the next epoch sets train()
            batches = ((self._subspace_features(model, images, ctx.task), labels)
                       for images, labels in ctx.iterate_images(classes, "train", self.params.prototype_batch_size))
            means = class_means(batches, classes, blocks * dim, ctx)
        # the merged head grows by a block of zeros for the new subspace and by the new classes' rows
        # (utils/inc_net.py:150-157); the new classes' rows are real in every block (ease.py:66-98)
        weight = torch.zeros(ctx.seen_classes, blocks * dim)
        if self.prototypes is not None:
            weight[:ctx.known_classes, :self.prototypes.shape[1]] = self.prototypes
        weight[ctx.known_classes:] = means
        with ctx.timer("complement"):
            self.prototypes = complement_prototypes(weight, self._task_rows(ctx), dim,
                                                    first_block=int(self.params.use_init_ptm))

    def predict(self, model, images: torch.Tensor, ctx: TaskContext) -> torch.Tensor:
        features = self._subspace_features(model, images, ctx.task)
        p = self.params
        return reweighted_logits(features, self.prototypes.to(features.device), self._task_rows(ctx),
                                 model.backbone.num_features, p.alpha, p.beta, p.use_init_ptm)

    def task_summary(self, model, ctx: TaskContext) -> dict:
        return {"adapter_sets": len(model.ease_adapters),
                "adapter_parameters": sum(p.numel() for p in model.ease_adapters.parameters())}

    def state_dict(self) -> dict:
        return {"prototypes": self.prototypes}

    def load_state_dict(self, state: dict) -> None:
        self.prototypes = state.get("prototypes")
