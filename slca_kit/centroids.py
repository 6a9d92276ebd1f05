"""Class statistics as several Gaussians per class: k-means centroids with diagonal variances, the storage HiDe-Prompt
uses by default (thu-ml/HiDe-Prompt engines/hide_promtp_wtp_and_tap_engine.py:398-415, ``multi-centroid``), and the
draws its classifier alignment trains on (:459-470)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .alignment import ClassMoments, cholesky_with_jitter, sample_gaussians


def kmeans(points: torch.Tensor, clusters: int, generator: torch.Generator, max_iter: int = 300,
           tol: float = 1e-4) -> torch.Tensor:
    """Cluster ids of ``points`` [n, d] (n >= clusters): k-means++ seeding, then Lloyd iterations until the centres
    move less than ``tol`` x the mean per-dimension variance of the points (squared), or ``max_iter`` (scikit-learn's
    ``KMeans`` defaults, one initialisation). Deterministic for a given generator."""
    points = points.to(torch.float64)
    count = points.shape[0]
    first = int(torch.randint(count, (1,), generator=generator, device=points.device))
    centres = points[first:first + 1]
    closest = ((points - centres) ** 2).sum(1)
    for _ in range(1, clusters):
        total = closest.sum()
        weights = closest / total if total > 0 else torch.full_like(closest, 1.0 / count)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        centres = torch.cat([centres, points[pick:pick + 1]])
        closest = torch.minimum(closest, ((points - points[pick]) ** 2).sum(1))
    threshold = tol * points.var(0, unbiased=False).mean()
    for _ in range(max_iter):
        assignment = torch.cdist(points, centres).argmin(1)
        moved = centres.clone()
        for cluster in range(clusters):
            members = points[assignment == cluster]
            if members.shape[0]:  # an empty cluster keeps its centre
                moved[cluster] = members.mean(0)
        shift = ((moved - centres) ** 2).sum()
        centres = moved
        if shift <= threshold:
            break
    return torch.cdist(points, centres).argmin(1)


@dataclass
class Centroids:
    """Gaussian components of classes: ``means`` and ``variances`` [m, d] (population variance of the members, as
    numpy's ``var``), ``labels`` [m] the class of each component, float32 on the CPU; draws add ``ridge`` to the
    variances."""

    means: torch.Tensor
    variances: torch.Tensor
    labels: torch.Tensor
    ridge: float

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, classes: list[int], per_class: int, ridge: float,
            generator: torch.Generator) -> "Centroids":
        """``per_class`` k-means components for each of ``classes`` (every class needs that many samples)."""
        means, variances, owners = [], [], []
        features = features.to(torch.float64)
        for label in classes:
            members = features[labels == label]
            assignment = kmeans(members, per_class, generator)
            for cluster in range(per_class):
                part = members[assignment == cluster]
                if part.shape[0] == 0:  # k-means++ seeds distinct points, so only with duplicate features
                    continue
                means.append(part.mean(0))
                variances.append(part.var(0, unbiased=False))
                owners.append(label)
        return cls(torch.stack(means).float().cpu(), torch.stack(variances).float().cpu(),
                   torch.as_tensor(owners, dtype=torch.long), ridge)

    def cat(self, other: "Centroids") -> "Centroids":
        return Centroids(torch.cat([self.means, other.means]), torch.cat([self.variances, other.variances]),
                         torch.cat([self.labels, other.labels]), self.ridge)

    def sample(self, per_component: int, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_component`` draws from N(mean, diag(variance) + ridge I) of every component whose variance is not
        all zero (single-member clusters are left out, :465-466); returns features and class labels, grouped by
        component."""
        usable = self.variances.mean(1) != 0
        means, std = self.means[usable].to(device), (self.variances[usable].to(device) + self.ridge).sqrt()
        noise = torch.randn(means.shape[0], per_component, means.shape[1], generator=generator, device=device)
        samples = means[:, None, :] + noise * std[:, None, :]
        return samples.reshape(-1, means.shape[1]), self.labels[usable].to(device).repeat_interleave(per_component)

    def as_dict(self) -> dict:
        return {"means": self.means, "variances": self.variances, "labels": self.labels, "ridge": self.ridge}

    @classmethod
    def from_dict(cls, state: dict) -> "Centroids":
        return cls(state["means"], state["variances"], state["labels"], float(state["ridge"]))


@dataclass
class ClassGaussians:
    """One Gaussian per class from ``ClassMoments`` (mean, unbiased covariance + ridge I): ``means`` [m, d],
    Cholesky factors ``chol`` [m, d, d] and ``labels`` [m], float32 on the CPU (the official ``covariance`` option,
    :387-391, :446-457)."""

    means: torch.Tensor
    chol: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_moments(cls, moments: ClassMoments, classes: list[int], ridge: float) -> "ClassGaussians":
        means, covs = moments.gaussians(ridge)
        chol, _ = cholesky_with_jitter(covs)
        return cls(means.float().cpu(), chol.float().cpu(), torch.as_tensor(classes, dtype=torch.long))

    def cat(self, other: "ClassGaussians") -> "ClassGaussians":
        return ClassGaussians(torch.cat([self.means, other.means]), torch.cat([self.chol, other.chol]),
                              torch.cat([self.labels, other.labels]))

    def sample(self, per_component: int, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        samples, positions = sample_gaussians(self.means.to(device), self.chol.to(device), per_component, generator)
        return samples, self.labels.to(device)[positions]

    def as_dict(self) -> dict:
        return {"means": self.means, "chol": self.chol, "labels": self.labels}

    @classmethod
    def from_dict(cls, state: dict) -> "ClassGaussians":
        return cls(state["means"], state["chol"], state["labels"])
