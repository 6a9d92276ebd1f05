import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from slca_kit.alignment import (
    AlignmentSettings,
    ClassMoments,
    LowRankCovariances,
    ReusedBuffers,
    align_classifier,
    cholesky_with_jitter,
    normalized_logits,
    sample_gaussians,
    shrink_factors,
)
from slca_kit.models.heads import CosineHead, IncrementalHead


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


def test_class_by_class_symmetrisation_equals_the_batched_formula_bit_for_bit():
    features, labels = _features(n=90, d=7)
    moments = ClassMoments.from_features(features, labels, [4, 5, 6])
    n = moments.counts[:, None]
    mean = moments.sums / n
    cov = torch.baddbmm(moments.outer, (n * mean)[:, :, None], mean[:, None, :], alpha=-1) / (n - 1)[:, :, None]
    expected = (cov + cov.transpose(1, 2)) * 0.5 + 1e-4 * torch.eye(7, dtype=torch.float64)
    assert torch.equal(moments.gaussians(1e-4)[1], expected)


@pytest.mark.parametrize("low_rank", [False, True])
def test_draws_into_reused_buffers_are_the_plain_draws_bit_for_bit(low_rank):
    torch.manual_seed(0)
    means = torch.randn(4, 6)
    a = torch.randn(4, 6, 6)
    covs = a @ a.transpose(1, 2) + 0.1 * torch.eye(6)
    factor = LowRankCovariances.from_covariances(covs, 2).float() if low_rank else torch.linalg.cholesky(covs)
    plain_generator, reused_generator, buffers = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3), \
        ReusedBuffers()
    for _ in range(2):  # the second call writes into the buffers the first allocated
        samples, positions = sample_gaussians(means, factor, 9, plain_generator)
        reused, reused_positions = sample_gaussians(means, factor, 9, reused_generator, buffers)
        assert torch.equal(samples, reused) and torch.equal(positions, reused_positions)
    if low_rank:  # the formula of the low-rank draw, written out: mu + U (sqrt(values) z1) + sqrt(residual) z2
        generator = torch.Generator().manual_seed(3)
        z1, z2 = torch.randn(4, 9, 2, generator=generator), torch.randn(4, 9, 6, generator=generator)
        expected = (means[:, None, :] + (z1 * factor.values.sqrt()[:, None, :]) @ factor.basis.transpose(1, 2)
                    + z2 * factor.residual.sqrt()[:, None, :])
    else:
        z = torch.randn(4, 9, 6, generator=torch.Generator().manual_seed(3))
        expected = means[:, None, :] + z @ factor.transpose(1, 2)
    assert torch.equal(sample_gaussians(means, factor, 9, torch.Generator().manual_seed(3), buffers)[0],
                       expected.reshape(-1, 6))


def test_reused_buffers_follow_shape_dtype_and_device():
    buffers, like = ReusedBuffers(), torch.zeros(1)
    first = buffers.get("x", (2, 3), like)
    assert buffers.get("x", (2, 3), like) is first
    assert buffers.get("x", (3, 3), like).shape == (3, 3)
    assert buffers.get("x", (3, 3), like.double()).dtype == torch.float64


def _head(blocks=(3, 2, 4), dim=5):
    torch.manual_seed(0)
    head = IncrementalHead(dim)
    for size in blocks:
        head.add_task(size)
    for block in head.heads:
        torch.nn.init.normal_(block.bias)
    return head


def test_fused_head_forward_gives_the_per_task_logits_and_gradients():
    head, features = _head(), torch.randn(6, 5)
    target = torch.randn(6, 9)
    grads = []
    for forward in (head, head.forward_fused):
        head.zero_grad()
        logits = forward(features)
        (logits * target).sum().backward()
        grads.append([p.grad.clone() for p in head.parameters()])
        assert torch.allclose(logits, head(features), atol=1e-6)
    for plain, fused in zip(*grads):
        assert torch.allclose(plain, fused, atol=1e-6)


def test_fused_head_forward_leaves_other_blocks_to_forward():
    head, features = _head(), torch.randn(6, 5)
    head.heads[1] = CosineHead(5, 2)
    assert torch.equal(head.forward_fused(features), head(features))


def test_alignment_with_the_fused_forward_trains_the_head_the_per_task_forward_trains(monkeypatch):
    means = torch.eye(6, dtype=torch.float64)[:4] * 3
    chol, _ = cholesky_with_jitter(torch.eye(6, dtype=torch.float64).expand(4, 6, 6) * 0.2)
    settings = AlignmentSettings(epochs=3, lr=0.1, momentum=0.9, weight_decay=5e-4, samples_per_class=16,
                                 batch_size=8, tau=0.1, mean_shrink=True)
    heads = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(IncrementalHead, "forward_fused", IncrementalHead.forward)
        head = _head((2, 2), dim=6)
        align_classifier(head, means, chol, torch.tensor([0, 0, 1, 1]), 1, [2, 2], settings,
                         torch.Generator().manual_seed(0))
        heads.append(head)
    for fused, plain in zip(heads[0].parameters(), heads[1].parameters()):
        assert torch.allclose(fused, plain, atol=1e-5)
    assert not torch.equal(heads[0].heads[0].weight, _head((2, 2), dim=6).heads[0].weight)  # it did train
