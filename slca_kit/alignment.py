"""Classifier alignment (SLCA, slca.md "Class statistics" and "Stage 2"): class moments that reduce exactly
across processes, a batched Gaussian sampler, logit normalization, and the head re-training loop."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .finite import ensure_finite_loss, ensure_finite_tensors
from .models.heads import IncrementalHead

ALIGNMENT_HINT = " (lower method.params.ca_lr?)"


@dataclass
class ClassMoments:
    """Sufficient statistics of features per class, in float64: sums add up across processes exactly as over
    one process (up to float64 rounding order), so ``torch.distributed`` SUM reduction gives the same Gaussian."""

    counts: torch.Tensor  # [K] float64
    sums: torch.Tensor  # [K, d] float64
    outer: torch.Tensor  # [K, d, d] float64, sum of x x^T

    @classmethod
    def from_features(cls, features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> "ClassMoments":
        features = features.to(torch.float64)
        dim = features.shape[1]
        counts = torch.zeros(len(classes), dtype=torch.float64, device=features.device)
        sums = torch.zeros(len(classes), dim, dtype=torch.float64, device=features.device)
        outer = torch.zeros(len(classes), dim, dim, dtype=torch.float64, device=features.device)
        for k, label in enumerate(classes):
            members = features[labels == label]
            counts[k] = members.shape[0]
            sums[k] = members.sum(0)
            outer[k] = members.T @ members
        return cls(counts, sums, outer)

    def add_(self, other: "ClassMoments") -> "ClassMoments":
        self.counts += other.counts
        self.sums += other.sums
        self.outer += other.outer
        return self

    def gaussians(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased covariance (as ``torch.cov``) + ridge * I, in float64."""
        if (self.counts < 2).any():
            bad = torch.nonzero(self.counts < 2).flatten().tolist()
            raise ValueError(f"classes at positions {bad} have fewer than 2 training samples: no covariance")
        n = self.counts[:, None]
        mean = self.sums / n
        # one [K, d, d] allocation, the rest in place: at 200 x 768 each pass is 0.9 GB of float64
        cov = torch.baddbmm(self.outer, (n * mean)[:, :, None], mean[:, None, :], alpha=-1)
        cov.div_((n - 1)[:, :, None])
        # exactly symmetric, class by class through one d x d scratch: (C + C^T) / 2 over the whole batch read
        # C^T across 0.9 GB and allocated another 0.9 GB, 3x slower here (docs/performance.md)
        scratch = torch.empty_like(cov[0])
        for one in cov:
            one.copy_(torch.add(one, one.T, out=scratch)).mul_(0.5)
        cov.diagonal(dim1=-2, dim2=-1).add_(ridge)
        return mean, cov


def cholesky_with_jitter(covs: torch.Tensor, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Batched Cholesky; if some covariance is not positive definite, add growing diagonal jitter and return the
    jitter used so the caller can say so."""
    jitter = 0.0
    eye = torch.eye(covs.shape[-1], dtype=covs.dtype, device=covs.device)
    scale = covs.diagonal(dim1=-2, dim2=-1).mean().clamp_min(1e-12).item()
    for attempt in range(max_tries + 1):
        factor, info = torch.linalg.cholesky_ex(covs + jitter * eye)
        if not info.any():
            return factor, jitter
        jitter = scale * 10.0 ** (attempt - 6)
    raise ValueError(f"covariance not positive definite even with jitter {jitter:.3g}")


@dataclass
class LowRankCovariances:
    """Each class's covariance kept as its ``rank`` largest eigenpairs plus the diagonal of the rest:
    C ~ U diag(values) U^T + diag(residual), exact on the diagonal. [K, d, k] + [K, k] + [K, d] numbers instead of
    [K, d, d] (at 768-d and k 64: 8.5 % of the memory)."""

    basis: torch.Tensor  # [K, d, k], orthonormal columns
    values: torch.Tensor  # [K, k], the largest eigenvalues
    residual: torch.Tensor  # [K, d], diag(C) - diag(U diag(values) U^T), >= 0

    @classmethod
    def from_covariances(cls, covs: torch.Tensor, rank: int) -> "LowRankCovariances":
        values, vectors = torch.linalg.eigh(covs.to(torch.float64))  # ascending
        rank = min(rank, covs.shape[-1])
        values, vectors = values[:, -rank:].clamp_min(0), vectors[:, :, -rank:]
        kept = (vectors ** 2 * values[:, None, :]).sum(-1)
        residual = (covs.to(torch.float64).diagonal(dim1=-2, dim2=-1) - kept).clamp_min(0)
        return cls(vectors, values, residual)

    def to(self, *args, **kwargs) -> "LowRankCovariances":
        return LowRankCovariances(*(t.to(*args, **kwargs) for t in (self.basis, self.values, self.residual)))

    def float(self) -> "LowRankCovariances":
        return self.to(torch.float32)

    def cat(self, other: "LowRankCovariances") -> "LowRankCovariances":
        return LowRankCovariances(*(torch.cat([a, b]) for a, b in zip((self.basis, self.values, self.residual),
                                                                       (other.basis, other.values, other.residual))))

    def dense(self) -> torch.Tensor:
        """The covariances these stand for, [K, d, d]."""
        return (self.basis * self.values[:, None, :]) @ self.basis.transpose(1, 2) + torch.diag_embed(self.residual)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.basis, self.values, self.residual))


class ReusedBuffers:
    """Tensors kept from one call to the next while their shape, dtype and device stay the same. At 200 classes x
    256 draws x 768-d one epoch's draws take 157 MB; allocated afresh each epoch, every page of them is faulted in
    and zeroed again (docs/performance.md, classifier alignment)."""

    def __init__(self):
        self._tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        kept = self._tensors.get(name)
        if kept is None or kept.shape != torch.Size(shape) or kept.dtype != like.dtype or kept.device != like.device:
            kept = self._tensors[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return kept


def sample_gaussians(means: torch.Tensor, chol: torch.Tensor | LowRankCovariances, per_class: int,
                     generator: torch.Generator | None = None,
                     buffers: ReusedBuffers | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``per_class`` samples from N(means[c], L_c L_c^T) for all classes at once: x = mu + z L^T; with
    ``LowRankCovariances``, x = mu + U (sqrt(values) z1) + sqrt(residual) z2, whose covariance is the low-rank one.
    With ``buffers`` the draws are written into tensors kept there (the same numbers, bit for bit): the result is
    overwritten by the next call with the same buffers.

    Returns features [C * per_class, d] and class positions [C * per_class] (0..C-1), grouped by class."""
    num_classes, dim = means.shape
    shape = (num_classes, per_class, dim)
    buffers = ReusedBuffers() if buffers is None else buffers
    if isinstance(chol, LowRankCovariances):
        rank = chol.values.shape[1]
        low = torch.randn((num_classes, per_class, rank), generator=generator,
                          out=buffers.get("low", (num_classes, per_class, rank), means))
        rest = torch.randn(shape, generator=generator, out=buffers.get("noise", shape, means))
        samples = torch.bmm(low.mul_(chol.values.sqrt()[:, None, :]), chol.basis.transpose(1, 2),
                            out=buffers.get("samples", shape, means))
        samples.add_(means[:, None, :]).add_(rest.mul_(chol.residual.sqrt()[:, None, :]))
    else:
        noise = torch.randn(shape, generator=generator, out=buffers.get("noise", shape, means))
        samples = torch.bmm(noise, chol.transpose(1, 2), out=buffers.get("samples", shape, means))
        samples.add_(means[:, None, :])
    positions = torch.arange(num_classes, device=means.device).repeat_interleave(per_class)
    return samples.reshape(-1, dim), positions


def normalized_logits(logits: torch.Tensor, task_sizes: list[int], tau: float) -> torch.Tensor:
    """Logit normalization of the reference CA stage: divide by the mean over tasks of each task block's L2 norm
    (+1e-7), then by the temperature tau (slca.md, Stage 2)."""
    blocks = torch.split(logits, task_sizes, dim=1)
    norms = torch.stack([block.norm(p=2, dim=1) + 1e-7 for block in blocks], dim=1).mean(dim=1, keepdim=True)
    return logits / norms / tau


def shrink_factors(class_task_ids: torch.Tensor, current_task: int) -> torch.Tensor:
    """Reference mean shrink: mean * (0.9 + 0.1 * (t_id + 1) / (T + 1)) with each class's REAL task id."""
    return 0.9 + 0.1 * (class_task_ids.to(torch.float64) + 1) / (current_task + 1)


def age_divisors(task_ids: torch.Tensor, current_task: int, settings: "AlignmentSettings",
                 generator: torch.Generator) -> torch.Tensor:
    """SLCA++ (slca.md): 1 + s (T - t) per sample, s = age_scale + U(-jitter, jitter)."""
    noise = torch.rand(task_ids.shape[0], generator=generator, device=task_ids.device) * 2 - 1
    s = settings.age_scale + settings.age_scale_jitter * noise
    return 1 + s * (current_task - task_ids).to(s.dtype)


@dataclass
class AlignmentSettings:
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    samples_per_class: int
    batch_size: int
    tau: float | None
    mean_shrink: bool
    # SLCA++: each sample of task t is divided by 1 + s (T - t), s = age_scale + U(-jitter, jitter) per sample.
    age_scale: float | None = None
    age_scale_jitter: float = 0.0


def align_classifier(head: nn.Module, means: torch.Tensor, chol: torch.Tensor | LowRankCovariances,
                     class_task_ids: torch.Tensor, current_task: int, task_sizes: list[int],
                     settings: AlignmentSettings, generator: torch.Generator) -> list[float]:
    """Re-train ``head`` (all tasks' blocks) on Gaussian features of every seen class (slca.md, Stage 2).

    SGD with cosine lr stepped per epoch; each epoch draws fresh samples, shuffles them, and takes batches of
    ``batch_size``. Returns the mean loss per epoch."""
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    scale = shrink_factors(class_task_ids, current_task) if settings.mean_shrink else torch.ones_like(means[:, 0])
    shifted = (means * scale[:, None].to(means)).float()
    chol = chol.float()
    buffers = ReusedBuffers()

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = sample_gaussians(shifted, chol, settings.samples_per_class, generator, buffers)
        if settings.age_scale is not None:
            inputs = inputs / age_divisors(class_task_ids[targets], current_task, settings, generator)[:, None]
        return inputs, targets

    forward = head.forward_fused if isinstance(head, IncrementalHead) else head
    return train_on_samples(forward, list(head.named_parameters()), draw, current_task, task_sizes, settings,
                            generator)


def train_on_samples(forward: Callable[[torch.Tensor], torch.Tensor], named_parameters: list[tuple[str, nn.Parameter]],
                     draw: Callable[[], tuple[torch.Tensor, torch.Tensor]], current_task: int, task_sizes: list[int],
                     settings: AlignmentSettings, generator: torch.Generator,
                     batches_per_epoch: int | None = None) -> list[float]:
    """The alignment loop on drawn features: per epoch ``draw()`` fresh (features, targets), shuffle them, and take
    SGD steps on batches of ``settings.batch_size`` (only the first ``batches_per_epoch`` when set), logits
    normalised when ``settings.tau`` is set; cosine lr stepped per epoch. Returns the mean loss per epoch."""
    buffers = ReusedBuffers()  # the shuffled draws: the previous epoch's are no longer read when the next are drawn
    optimizer = torch.optim.SGD([p for _, p in named_parameters], lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    epoch_losses = []
    for epoch in range(settings.epochs):
        inputs, targets = draw()
        order = torch.randperm(inputs.shape[0], generator=generator, device=inputs.device)
        inputs = torch.index_select(inputs, 0, order, out=buffers.get("shuffled", tuple(inputs.shape), inputs))
        targets = targets[order]
        starts = range(0, inputs.shape[0], settings.batch_size)
        losses = []
        for step, start in enumerate(starts[:batches_per_epoch]):
            logits = forward(inputs[start:start + settings.batch_size])
            if settings.tau is not None:
                logits = normalized_logits(logits, task_sizes, settings.tau)
            loss = F.cross_entropy(logits, targets[start:start + settings.batch_size])
            losses.append(ensure_finite_loss(loss, "classifier alignment", current_task, epoch, step,
                                             hint=ALIGNMENT_HINT))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        ensure_finite_tensors(named_parameters, "aligned head parameter", "classifier alignment",
                              current_task, epoch, hint=ALIGNMENT_HINT)
        epoch_losses.append(sum(losses) / len(losses))
    return epoch_losses
