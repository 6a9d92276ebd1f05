import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from slca_kit.alignment import (
    AlignmentSettings,
    ClassMoments,
    align_classifier,
    cholesky_with_jitter,
    normalized_logits,
    sample_gaussians,
    shrink_factors,
)
from slca_kit.models.heads import IncrementalHead


def _features(seed=0, n=60, d=5):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g) * 3 + 1
    labels = torch.arange(n) % 3 + 4  # classes 4, 5, 6
    return features, labels


def test_moments_match_torch_cov_plus_ridge():
    features, labels = _features()
    means, covs = ClassMoments.from_features(features, labels, [4, 5, 6]).gaussians(ridge=1e-4)
    for k, label in enumerate([4, 5, 6]):
        members = features[labels == label].double()
        assert torch.allclose(means[k], members.mean(0), atol=1e-12)
        expected = torch.cov(members.T) + 1e-4 * torch.eye(5, dtype=torch.float64)
        assert torch.allclose(covs[k], expected, atol=1e-10)
    assert torch.equal(covs, covs.transpose(1, 2))  # exactly symmetric


def test_moments_of_shards_add_up_to_the_whole():
    """What a SUM all-reduce over processes does: per-shard moments added equal one pass over everything."""
    features, labels = _features(n=61)
    whole = ClassMoments.from_features(features, labels, [4, 5, 6])
    shards = [ClassMoments.from_features(features[r::3], labels[r::3], [4, 5, 6]) for r in range(3)]
    total = shards[0].add_(shards[1]).add_(shards[2])
    for a, b in zip(whole.gaussians(1e-4), total.gaussians(1e-4)):
        assert torch.allclose(a, b, atol=1e-10)


def test_single_sample_class_is_rejected():
    features, labels = torch.randn(3, 2), torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="fewer than 2"):
        ClassMoments.from_features(features, labels, [0, 1]).gaussians(1e-4)


def test_batched_sampler_matches_multivariate_normal_statistics():
    torch.manual_seed(0)
    d, n = 4, 40_000
    means = torch.randn(3, d, dtype=torch.float64) * 2
    a = torch.randn(3, d, d, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) + 0.5 * torch.eye(d, dtype=torch.float64)
    chol, jitter = cholesky_with_jitter(covs)
    assert jitter == 0.0
    samples, positions = sample_gaussians(means, chol, n, torch.Generator().manual_seed(1))
    assert samples.shape == (3 * n, d) and positions.tolist()[:: n] == [0, 1, 2]
    for c in range(3):
        ours = samples[positions == c]
        reference = MultivariateNormal(means[c], covs[c]).sample((n,))
        # both estimate the same moments; tolerance ~5 standard errors of the estimates
        scale = covs[c].diagonal().sqrt()
        tol_mean = 5 * scale / math.sqrt(n)
        assert ((ours.mean(0) - means[c]).abs() < tol_mean).all()
        assert ((reference.mean(0) - means[c]).abs() < tol_mean).all()
        tol_cov = 5 * (scale[:, None] * scale[None, :]) * math.sqrt(2 / n)
        assert ((torch.cov(ours.T) - covs[c]).abs() < tol_cov).all()
        assert ((torch.cov(ours.T) - torch.cov(reference.T)).abs() < 2 * tol_cov).all()


def test_non_positive_definite_covariance_gets_jitter():
    v = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    singular = (v.T @ v)[None]  # rank 1
    chol, jitter = cholesky_with_jitter(singular)
    assert jitter > 0
    assert torch.allclose(chol @ chol.transpose(1, 2), singular + jitter * torch.eye(3, dtype=torch.float64))


def test_logit_normalization_hand_computed():
    logits = torch.tensor([[3.0, 4.0, 0.0, 5.0, 12.0]])  # tasks of 3 and 2 classes
    # block norms: ||(3,4,0)|| = 5, ||(5,12)|| = 13, mean = 9; tau = 0.5 -> divide by 4.5
    out = normalized_logits(logits, [3, 2], tau=0.5)
    expected = logits / ((5 + 1e-7 + 13 + 1e-7) / 2) / 0.5
    assert torch.allclose(out, expected)
    assert torch.allclose(out, torch.tensor([[3 / 4.5, 4 / 4.5, 0.0, 5 / 4.5, 12 / 4.5]]), atol=1e-6)


def test_mean_shrink_uses_real_task_ids():
    task_ids = torch.tensor([0, 0, 1, 2])
    factors = shrink_factors(task_ids, current_task=2)
    assert torch.allclose(factors, torch.tensor([0.9 + 0.1 / 3, 0.9 + 0.1 / 3, 0.9 + 0.2 / 3, 1.0],
                                                dtype=torch.float64))


def test_alignment_learns_separable_gaussians():
    torch.manual_seed(0)
    d = 8
    means = torch.eye(d, dtype=torch.float64)[:4] * 4
    covs = torch.eye(d, dtype=torch.float64).expand(4, d, d) * 0.1
    chol, _ = cholesky_with_jitter(covs)
    head = IncrementalHead(d)
    head.add_task(2)
    head.add_task(2)
    settings = AlignmentSettings(epochs=5, lr=0.1, momentum=0.9, weight_decay=0.0, samples_per_class=64,
                                 batch_size=32, tau=0.1, mean_shrink=True)
    losses = align_classifier(head, means, chol, torch.tensor([0, 0, 1, 1]), 1, [2, 2], settings,
                              torch.Generator().manual_seed(0))
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert head(means.float()).argmax(1).tolist() == [0, 1, 2, 3]
