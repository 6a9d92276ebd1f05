"""SLCA: Slow Learner with Classifier Alignment (Zhang et al., ICCV 2023), as the reference code does it.

Stage 1 is the slow learner (backbone lr = head lr / 100, current-task cross-entropy, old heads frozen). After it,
class statistics of the new classes are stored; from the second task on, a copy of all heads is re-trained on
Gaussian samples of every seen class with logit normalization and used for evaluation. The stage-1 heads stay in
the model (the reference's ``fc.backup()`` / ``fc.recall()``), unless ``keep_aligned_heads`` is set.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from ..alignment import AlignmentSettings, ClassMoments, LowRankCovariances, align_classifier, cholesky_with_jitter
from ..errors import ConfigError
from ..models.heads import IncrementalHead
from .base import Method, TaskContext, require_positive


class SLCA(Method):
    name = "slca"

    @dataclass
    class Params:
        backbone_lr_scale: float = 0.01  # bcb_lrscale 1/100 (slca.md, Stage 1)
        ca_epochs: int = 5  # slca.md, Stage 2
        ca_lr: float = 0.01
        ca_momentum: float = 0.9
        ca_weight_decay: float = 5e-4
        samples_per_class: int = 256
        ca_batch_size: int = 256
        logit_norm_tau: float | None = 0.1  # 0.05 for Cars; null disables logit normalization (slca.md)
        cov_ridge: float = 1e-4  # torch.cov + 1e-4 * I (slca.md, Class statistics)
        mean_shrink: bool = True  # older tasks' means shrink toward 0.9x (slca.md, Stage 2)
        keep_aligned_heads: bool = False  # reference restores the stage-1 heads after each task
        # full: each class's d x d covariance, as the reference. lowrank: its covariance_rank largest eigenpairs plus
        # the diagonal of the rest, drawn from without a Cholesky factor (slca_kit's option, not the reference's)
        covariance: str = "full"
        covariance_rank: int = 64

        def __post_init__(self):
            require_positive(self, "samples_per_class", "ca_batch_size", "logit_norm_tau", "covariance_rank")
            if self.covariance not in ("full", "lowrank"):
                raise ConfigError(f"method.params.covariance: {self.covariance!r}; expected 'full' or 'lowrank'")

    def __init__(self, params, config):
        super().__init__(params, config)
        self.means = torch.zeros(0, 0, dtype=torch.float64)  # [seen, d], float64 as in the reference
        self.covs = torch.zeros(0, 0, 0)  # [seen, d, d], float32 as in the reference (covariance: full)
        self.lowrank: LowRankCovariances | None = None  # float32 (covariance: lowrank)
        self.aligned_head: IncrementalHead | None = None
        self.alignment_losses: list[list[float]] = []

    def training_images_needed(self) -> tuple[int, str]:
        # an unbiased covariance, as torch.cov in GengDavid/SLCA models/base.py:262
        return 2, f"{self.name}'s class covariance"

    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        self.aligned_head = None

    def after_training(self, model, ctx: TaskContext) -> None:
        with ctx.timer("statistics"):
            self._store_statistics(ctx)
        if ctx.task == 0:
            return
        with ctx.timer("alignment"):
            self._align(model, ctx)

    def _store_statistics(self, ctx: TaskContext) -> None:
        """Mean and covariance of each new class's training features under TEST transforms, reduced over
        processes. Old classes are never recomputed (slca.md, Class statistics)."""
        classes = ctx.scenario.task_classes(ctx.task)
        features, labels = ctx.extract_features(classes, "train")
        moments = ClassMoments.from_features(features, labels, classes)
        moments = ClassMoments(*(ctx.reduce_sum(t) for t in (moments.counts, moments.sums, moments.outer)))
        means, covs = moments.gaussians(self.params.cov_ridge)
        self.means = means.cpu() if self.means.numel() == 0 else torch.cat([self.means, means.cpu()])
        if self.params.covariance == "lowrank":
            new = LowRankCovariances.from_covariances(covs, self.params.covariance_rank).float().to("cpu")
            self.lowrank = new if self.lowrank is None else self.lowrank.cat(new)
        else:
            self.covs = covs.float().cpu() if self.covs.numel() == 0 else torch.cat([self.covs, covs.float().cpu()])

    def _align(self, model, ctx: TaskContext) -> None:
        params = self.params
        device = ctx.device
        if self.lowrank is not None:
            chol = self.lowrank.to(device)
        else:
            # float32, as MultivariateNormal(mean.float(), cov.float()) factors it (GengDavid/SLCA models/slca.py:205)
            chol, jitter = cholesky_with_jitter(self.covs.to(device, torch.float32))
            if jitter > 0:
                ctx.log(f"task {ctx.task}: a class covariance was not positive definite; added jitter {jitter:.3g}")
        head = copy.deepcopy(model.head).to(device).float()
        head.train()
        # Identical on every process (same seed, same reduced statistics), so no synchronisation is needed.
        generator = torch.Generator(device=device).manual_seed(self.config.train.seed * 1_000 + ctx.task)
        seen = ctx.seen_classes
        task_ids = torch.as_tensor(ctx.scenario.class_task_ids()[:seen], device=device)
        losses = align_classifier(head, self.means.to(device), chol, task_ids, ctx.task,
                                  list(ctx.scenario.task_sizes[:ctx.task + 1]), self.alignment_settings(), generator)
        self.alignment_losses.append(losses)
        head.eval().requires_grad_(False)
        self.aligned_head = head
        if params.keep_aligned_heads:
            model.head.load_state_dict(head.state_dict())

    def alignment_settings(self) -> AlignmentSettings:
        params = self.params
        return AlignmentSettings(
            epochs=params.ca_epochs, lr=params.ca_lr, momentum=params.ca_momentum,
            weight_decay=params.ca_weight_decay, samples_per_class=params.samples_per_class,
            batch_size=params.ca_batch_size, tau=params.logit_norm_tau, mean_shrink=params.mean_shrink,
        )

    def predict(self, model, images: torch.Tensor, ctx: TaskContext) -> torch.Tensor:
        """Aligned heads with RAW logits at test time (no normalization), as in the reference."""
        if self.aligned_head is None:
            return model(images)
        features = model.features(images).float()
        return self.aligned_head.to(features.device)(features)

    def state_dict(self) -> dict:
        aligned = None if self.aligned_head is None else {k: v.cpu() for k, v in self.aligned_head.state_dict().items()}
        lowrank = None if self.lowrank is None else dataclasses.asdict(self.lowrank)
        return {"means": self.means, "covs": self.covs, "lowrank_covs": lowrank, "aligned_head": aligned,
                "alignment_losses": self.alignment_losses}

    def load_state_dict(self, state: dict) -> None:
        self.means, self.covs = state["means"], state["covs"]
        lowrank = state.get("lowrank_covs")
        self.lowrank = None if lowrank is None else LowRankCovariances(**lowrank)
        self.alignment_losses = list(state.get("alignment_losses", []))
        self.aligned_head = None
        if state.get("aligned_head") is not None:
            weights = state["aligned_head"]
            head = IncrementalHead(self.means.shape[1])
            for index in range(len([k for k in weights if k.endswith(".weight")])):
                head.add_task(weights[f"heads.{index}.weight"].shape[0])
            head.load_state_dict(weights)
            self.aligned_head = head.eval().requires_grad_(False)
