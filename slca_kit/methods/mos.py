"""MOS: Mixture of Selectors (Sun et al., AAAI 2025), as sun-hailong/AAAI25-MOS models/mos.py does it.

Every task trains a set of AdaptFormer adapters (one per block, parallel to the MLP, bottleneck 16) on the frozen ViT
together with a linear head over all classes (backbone/vit_mos.py:155-178, 265-275). From the second task on, the new
set starts from the last one and is pulled toward the mean of the earlier sets, ``(1 - m) new + m mean``, before
every block's forward pass and after every optimizer step (vit_mos.py:303-346, 357-365; mos.py:173-175). The loss is
cross-entropy on the task's classes plus an orthogonality term that pushes the batch's features away from each other
and from the stored class means (mos.py:163-167, 335-355). After training, each new class's Gaussian (mean and
covariance of its features under its task's adapters) is stored, and from the second task on the head is re-trained
on samples of every seen class (mos.py:198-333). Each class also gets a prototype: its mean feature under the FIRST
task's adapters (mos.py:51-72, utils/inc_net.py:135-142).

At test, the prototypes' cosine logits name a task; its adapters give features and head logits, whose best class
names a task again, until the task repeats or after four rounds (self-refined adapter retrieval). The answer is the
softmax of those head logits plus the softmax of the prototype logits times the number of tasks (mos.py:357-403).
Class moments and prototype sums are reduced over processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..alignment import AlignmentSettings, ClassMoments, align_classifier, cholesky_with_jitter
from ..errors import ConfigError
from ..models.parallel_adapter import ParallelAdapters
from .base import Method, TaskContext, require_positive
from .prototypes import class_means, cosine_logits


@torch.no_grad()
def mean_parameters(modules: list[nn.Module]) -> list[torch.Tensor]:
    """The element-wise mean of each parameter over ``modules`` (same structure), in ``parameters()`` order: the
    official prefix sum of the stored sets divided by their number (vit_mos.py:315-326, 338-344)."""
    return [torch.stack(group).mean(0) for group in zip(*(list(m.parameters()) for m in modules))]


@torch.no_grad()
def merge_toward(current: nn.Module, target: list[torch.Tensor], momentum: float) -> None:
    """``current``'s parameters <- (1 - momentum) current + momentum target (vit_mos.py:328-346 ``reweight_adapter``).
    Written through ``.data`` as the official code does, so that a merge between a forward pass and its backward pass
    is not an autograd error."""
    for parameter, mean in zip(current.parameters(), target):
        parameter.data.mul_(1 - momentum).add_(mean, alpha=momentum)


def orthogonality_loss(features: torch.Tensor, class_means: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """mos.py:335-355: rows = stored class means then the batch's features; cross-entropy of their dot products
    divided by ``temperature`` against each row's own index (raw features, not normalised)."""
    rows = features if class_means is None else torch.cat([class_means.to(features), features])
    similarity = rows @ rows.T / temperature
    return F.cross_entropy(similarity, torch.arange(rows.shape[0], device=rows.device))


def self_refined_logits(head_logits: torch.Tensor, first_task: torch.Tensor, class_task: torch.Tensor,
                        rounds: int) -> torch.Tensor:
    """mos.py:376-396 for a batch: ``head_logits`` [B, adapter sets, classes] are the head's logits of each image's
    features under each set. Start at the set ``first_task`` names; take that set's logits; if their best class's task
    (``class_task`` [classes]) is the same set, or after ``rounds`` rounds, stop; otherwise move to that set."""
    batch = torch.arange(head_logits.shape[0], device=head_logits.device)
    current = first_task.clone()
    logits = head_logits[batch, current]
    active = torch.ones_like(current, dtype=torch.bool)
    for round_number in range(1, rounds + 1):
        logits = torch.where(active[:, None], head_logits[batch, current], logits)
        named = class_task[logits.argmax(1)]
        stop = (named == current) | (round_number >= rounds)
        current = torch.where(active & ~stop, named, current)
        active = active & ~stop
        if not active.any():
            break
    return logits


def ensemble(refined_logits: torch.Tensor, prototype_logits: torch.Tensor, tasks: int) -> torch.Tensor:
    """mos.py:398-401: softmax of the refined head logits + softmax of the prototype logits at temperature
    1 / tasks (``tasks`` counts the current one)."""
    return refined_logits.softmax(dim=1) + (prototype_logits * tasks).softmax(dim=1)


class MOS(Method):
    name = "mos"

    @dataclass
    class Params:
        adapter_bottleneck: int = 16  # ffn_num (exps/mos_*.json)
        adapter_scale: float = 0.1  # ffn_adapter_scalar "0.1" (utils/inc_net.py:22)
        adapter_dropout: float = 0.1  # after the ReLU, training only (backbone/vit_mos.py:77, 269)
        adapter_momentum: float = 0.1  # exps/mos_*.json
        # the official code merges before every block's forward pass as well as after every optimizer step
        # (vit_mos.py:360-365, mos.py:174-175); false merges only after each step
        merge_before_blocks: bool = True
        head_lr_scale: float = 0.1  # the head trains at init_lr * 0.1, the adapters at init_lr (mos.py:119-123)
        orthogonality_weight: float = 0.1  # reg (exps/mos_*.json)
        orthogonality_temperature: float = 0.8  # mos.py:346, 352
        ca_epochs: int = 30  # crct_epochs (exps/mos_*.json)
        ca_lr: float = 0.005  # exps/mos_*.json
        ca_momentum: float = 0.9  # mos.py:253
        ca_weight_decay: float = 0.0005  # the task's weight_decay (mos.py:252): 0.005 for ImageNet-R
        samples_per_class: int = 240  # batch_size * 5 per class and per head step (mos.py:261, 304-306): CIFAR 48
        cov_ridge: float = 1e-4  # torch.cov + 1e-4 I (mos.py:222)
        refine_rounds: int = 4  # MAX_ITER (mos.py:379)
        ensemble: bool = True  # exps/mos_*.json
        prototype_batch_size: int = 128  # images per forward pass for the statistics (no effect on results)

        def __post_init__(self):
            require_positive(self, "adapter_bottleneck", "adapter_scale", "orthogonality_temperature",
                             "samples_per_class", "refine_rounds", "prototype_batch_size")
            if not 0 <= self.adapter_dropout < 1:
                raise ConfigError(f"method.params.adapter_dropout: {self.adapter_dropout}; must be in [0, 1)")
            if not 0 <= self.adapter_momentum <= 1:
                raise ConfigError(f"method.params.adapter_momentum: {self.adapter_momentum}; must be in [0, 1]")

    @classmethod
    def backbone_sources(cls, params) -> tuple[str, ...]:
        return ("timm",)  # the adapters hook into timm's blocks

    def __init__(self, params, config):
        super().__init__(params, config)
        self.means: torch.Tensor | None = None  # [seen, d] float32, each class under its own task's adapters
        self.covs: torch.Tensor | None = None  # [seen, d, d] float32
        self.prototypes: torch.Tensor | None = None  # [seen, d] float32, under the first task's adapters
        self.alignment_losses: list[list[float]] = []
        self._batch_features: torch.Tensor | None = None
        self._merge_hooks: list = []
        self._earlier_mean: list[torch.Tensor] | None = None

    def training_images_needed(self) -> tuple[int, str]:
        return 2, f"{self.name}'s class covariance (torch.cov, mos.py:222)"

    # -- structure ----------------------------------------------------------------------------------
    def grow(self, model, ctx: TaskContext) -> None:
        dim = model.backbone.num_features
        device = next(model.backbone.parameters()).device
        if not hasattr(model, "mos_adapters"):
            model.mos_adapters = nn.ModuleList()
            model.feature_fn = self._feature_fn(model)
        p = self.params
        adapters = ParallelAdapters(model.backbone.blocks, dim, p.adapter_bottleneck, p.adapter_scale,
                                    p.adapter_dropout).to(device)
        if len(model.mos_adapters):  # one ``cur_adapter`` carries on from task to task (vit_mos.py:255, 310-312)
            adapters.adapters.load_state_dict(model.mos_adapters[-1].adapters.state_dict())
        model.mos_adapters.append(adapters)

    def _feature_fn(self, model):
        def features(images: torch.Tensor) -> torch.Tensor:
            out = model.backbone(images)
            if model.training:  # the orthogonality term needs the batch's features (mos.py:167)
                self._batch_features = out
            return out

        return features

    @staticmethod
    def _use_adapters(model, index: int) -> None:
        for position, adapters in enumerate(model.mos_adapters):
            adapters.enabled = position == index

    # -- training -----------------------------------------------------------------------------------
    def before_task(self, model, ctx: TaskContext) -> None:
        model.backbone.requires_grad_(False)
        # one linear head over all classes, trained whole: earlier rows see weight decay only (mos.py:119-122, 164)
        model.head.requires_grad_(True)
        for index, adapters in enumerate(model.mos_adapters):
            adapters.requires_grad_(index == ctx.task)
        self._use_adapters(model, ctx.task)
        self._remove_merge_hooks()
        self._earlier_mean = None
        if self.params.merge_before_blocks and ctx.task > 0:
            self._merge_hooks = [block.register_forward_pre_hook(self._merge_hook(model, ctx.task))
                                 for block in model.backbone.blocks]

    def _merge(self, model, task: int) -> None:
        if task == 0 or self.params.adapter_momentum == 0:
            return
        if self._earlier_mean is None:  # the earlier sets are frozen: their mean is computed once a task
            self._earlier_mean = mean_parameters(list(model.mos_adapters[:task]))
        merge_toward(model.mos_adapters[task], self._earlier_mean, self.params.adapter_momentum)

    def _merge_hook(self, model, task: int):
        def merge(module, inputs):
            if model.training:
                self._merge(model, task)

        return merge

    def _remove_merge_hooks(self) -> None:
        for hook in self._merge_hooks:
            hook.remove()
        self._merge_hooks = []

    def param_groups(self, model, ctx: TaskContext) -> list[dict]:
        lr = self.config.train.lr
        return [{"name": "adapters", "params": list(model.mos_adapters[ctx.task].parameters()), "lr": lr},
                {"name": "head", "params": list(model.head.parameters()), "lr": lr * self.params.head_lr_scale}]

    def training_loss(self, model, images, labels, ctx: TaskContext) -> torch.Tensor:
        loss = super().training_loss(model, images, labels, ctx)
        means = None if self.means is None else self.means.to(ctx.device)
        orthogonality = orthogonality_loss(self._batch_features.float(), means, self.params.orthogonality_temperature)
        self._batch_features = None
        return loss + self.params.orthogonality_weight * orthogonality

    def after_optimizer_step(self, model, ctx: TaskContext) -> None:
        self._merge(model, ctx.task)  # adapter_merge (mos.py:173-175)

    # -- statistics, alignment ------------------------------------------------------------------------
    def after_training(self, model, ctx: TaskContext) -> None:
        self._remove_merge_hooks()
        classes = ctx.scenario.task_classes(ctx.task)
        with ctx.timer("statistics"), torch.no_grad():
            model.eval()
            own, first, labels = [], [], []
            for images, batch_labels in ctx.iterate_images(classes, "train", self.params.prototype_batch_size):
                self._use_adapters(model, ctx.task)
                own.append(model.features(images).float())
                self._use_adapters(model, 0)
                first.append(own[-1] if ctx.task == 0 else model.features(images).float())
                labels.append(batch_labels.to(ctx.device))
            self._use_adapters(model, ctx.task)
            dim = model.backbone.num_features
            own_features = torch.cat(own) if own else torch.zeros(0, dim, device=ctx.device)
            all_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=ctx.device)
            moments = ClassMoments.from_features(own_features, all_labels, classes)
            moments = ClassMoments(*(ctx.reduce_sum(t) for t in (moments.counts, moments.sums, moments.outer)))
            means, covs = moments.gaussians(self.params.cov_ridge)
            prototypes = class_means(zip(first, labels), classes, dim, ctx)
            self.means = self._append(self.means, means.float().cpu())
            self.covs = self._append(self.covs, covs.float().cpu())
            self.prototypes = self._append(self.prototypes, prototypes)
        if ctx.task > 0:
            with ctx.timer("alignment"):
                self._align(model, ctx)

    @staticmethod
    def _append(stored: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        return new if stored is None else torch.cat([stored, new])

    def _align(self, model, ctx: TaskContext) -> None:
        """The head itself is re-trained (mos.py:116, 247-333) on ``samples_per_class`` draws of every seen class per
        epoch, in batches of the same size, without logit normalisation or mean shrinking."""
        p = self.params
        device = ctx.device
        # float32, as MultivariateNormal(mean.float(), cov.float()) does (sun-hailong/AAAI25-MOS models/mos.py:269)
        chol, jitter = cholesky_with_jitter(self.covs.to(device, torch.float32))
        if jitter > 0:
            ctx.log(f"task {ctx.task}: a class covariance was not positive definite; added jitter {jitter:.3g}")
        settings = AlignmentSettings(epochs=p.ca_epochs, lr=p.ca_lr, momentum=p.ca_momentum,
                                     weight_decay=p.ca_weight_decay, samples_per_class=p.samples_per_class,
                                     batch_size=p.samples_per_class, tau=None, mean_shrink=False)
        # the same seed and reduced statistics on every process give the same head without synchronisation
        generator = torch.Generator(device=device).manual_seed(self.config.train.seed * 1_000 + ctx.task)
        task_ids = torch.as_tensor(ctx.scenario.class_task_ids()[:ctx.seen_classes], device=device)
        model.head.train()
        losses = align_classifier(model.head, self.means.to(device, torch.float64), chol, task_ids, ctx.task,
                                  list(ctx.scenario.task_sizes[:ctx.task + 1]), settings, generator)
        model.head.eval()
        self.alignment_losses.append(losses)

    # -- test -----------------------------------------------------------------------------------------
    def predict(self, model, images: torch.Tensor, ctx: TaskContext) -> torch.Tensor:
        sets = len(model.mos_adapters)
        per_set = []
        for index in range(sets):
            self._use_adapters(model, index)
            per_set.append(model.features(images).float())
        self._use_adapters(model, ctx.task)
        class_task = torch.as_tensor(ctx.scenario.class_task_ids()[:ctx.seen_classes], device=images.device)
        prototype_logits = cosine_logits(per_set[0], self.prototypes)
        head_logits = torch.stack([model.head(features).float() for features in per_set], dim=1)
        refined = self_refined_logits(head_logits, class_task[prototype_logits.argmax(1)], class_task,
                                      self.params.refine_rounds)
        return ensemble(refined, prototype_logits, sets) if self.params.ensemble else refined

    def task_summary(self, model, ctx: TaskContext) -> dict:
        return {"adapter_sets": len(model.mos_adapters),
                "adapter_parameters": sum(p.numel() for p in model.mos_adapters.parameters())}

    def state_dict(self) -> dict:
        return {"means": self.means, "covs": self.covs, "prototypes": self.prototypes,
                "alignment_losses": self.alignment_losses}

    def load_state_dict(self, state: dict) -> None:
        self.means, self.covs, self.prototypes = state.get("means"), state.get("covs"), state.get("prototypes")
        self.alignment_losses = list(state.get("alignment_losses", []))
