"""FeCAM: Feature Covariance-Aware Metric (Goswami et al., NeurIPS 2023), as its ViT scripts do it
(dipamgoswami/FeCAM FeCAM_vit_cifar100.py, FeCAM_vit_imagenet-r.py).

The pretrained ViT stays frozen and nothing trains. After each task, every new class's mean and covariance of
L2-normalised features (:75, :83-84) are stored; each covariance is shrunk, ``cov + a1 * mean(diag) * I +
a2 * mean(off-diagonal) * (1 - I)`` (:29-39), then normalised to a correlation matrix (:41-48). A test image goes
to the class of smallest Mahalanobis distance with the pseudo-inverse of that matrix (:51-57, :100-106). Class
moments are ``ClassMoments`` reduced over processes, as SLCA's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..alignment import ClassMoments
from .base import Method, TaskContext


def shrink_covariances(covs: torch.Tensor, diagonal: float, off_diagonal: float) -> torch.Tensor:
    """FeCAM_vit_cifar100.py:29-39 for a stack [C, d, d]; the off-diagonal mean is over the non-zero entries."""
    dim = covs.shape[-1]
    eye = torch.eye(dim, dtype=covs.dtype, device=covs.device)
    diag_mean = torch.diagonal(covs, dim1=-2, dim2=-1).mean(-1)
    off = covs * (1 - eye)
    nonzero = (off != 0).sum((-2, -1)).clamp(min=1)
    off_mean = off.sum((-2, -1)) / nonzero
    return covs + diagonal * diag_mean[:, None, None] * eye + off_diagonal * off_mean[:, None, None] * (1 - eye)


def correlation_matrices(covs: torch.Tensor) -> torch.Tensor:
    """cov / (sd sd^T), sd = sqrt(diag(cov)) (FeCAM_vit_cifar100.py:41-48)."""
    sd = torch.diagonal(covs, dim1=-2, dim2=-1).sqrt()
    return covs / (sd[:, :, None] * sd[:, None, :])


def mahalanobis_distances(features: torch.Tensor, means: torch.Tensor, precisions: torch.Tensor) -> torch.Tensor:
    """[batch, classes]: (x - mu_c)^T P_c (x - mu_c) for every class (FeCAM_vit_cifar100.py:51-57)."""
    diff = features[None, :, :] - means[:, None, :]  # [C, B, d]
    return ((diff @ precisions) * diff).sum(-1).T


class FeCAM(Method):
    name = "fecam"

    @dataclass
    class Params:
        # shrink_cov's alpha1 / alpha2: 1 / 0 in FeCAM_vit_cifar100.py:36-37, 10 / 10 in FeCAM_vit_imagenet-r.py:45-46
        shrink_diagonal: float = 1.0
        shrink_off_diagonal: float = 0.0
        normalize_covariance: bool = True  # normalize_cov (FeCAM_vit_cifar100.py:88)
        normalize_features: bool = True  # F.normalize of the CLS feature (FeCAM_vit_cifar100.py:75, :97)

    def __init__(self, params, config):
        super().__init__(params, config)
        self.means = torch.zeros(0, 0)  # [seen, d] float32
        self.precisions = torch.zeros(0, 0, 0)  # [seen, d, d] float32: pinv of the shrunk, normalised covariance
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # copied once, not per batch

    def training_images_needed(self) -> tuple[int, str]:
        return 2, f"{self.name}'s class covariance"  # np.cov is unbiased

    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        model.backbone.requires_grad_(False)

    def train_epochs(self, ctx: TaskContext) -> int:
        return 0  # the ViT scripts never train

    def _features(self, features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        return F.normalize(features, dim=1) if self.params.normalize_features else features

    def after_training(self, model, ctx: TaskContext) -> None:
        classes = ctx.scenario.task_classes(ctx.task)
        with ctx.timer("statistics"):
            features, labels = ctx.extract_features(classes, "train")
            moments = ClassMoments.from_features(self._features(features), labels, classes)
            moments = ClassMoments(*(ctx.reduce_sum(t) for t in (moments.counts, moments.sums, moments.outer)))
            means, covs = moments.gaussians(0.0)  # float64, as numpy
            covs = shrink_covariances(covs, self.params.shrink_diagonal, self.params.shrink_off_diagonal)
            if self.params.normalize_covariance:
                covs = correlation_matrices(covs)
            precisions = torch.linalg.pinv(covs)  # np.linalg.pinv: by SVD
        means, precisions = means.float().cpu(), precisions.float().cpu()
        if self.means.numel() == 0:
            self.means, self.precisions = means, precisions
        else:
            self.means = torch.cat([self.means, means])
            self.precisions = torch.cat([self.precisions, precisions])
        self._on_device = {}

    def predict(self, model, images: torch.Tensor, ctx: TaskContext) -> torch.Tensor:
        """Negative distances, so that the argmax (the trainer's prediction) is FeCAM's argmin."""
        features = self._features(model.features(images))
        if features.device not in self._on_device:
            self._on_device[features.device] = (self.means.to(features.device), self.precisions.to(features.device))
        return -mahalanobis_distances(features, *self._on_device[features.device])

    def state_dict(self) -> dict:
        return {"means": self.means, "precisions": self.precisions}

    def load_state_dict(self, state: dict) -> None:
        self.means, self.precisions = state["means"], state["precisions"]
        self._on_device = {}
