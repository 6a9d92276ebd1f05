"""``covariance: lowrank`` for SLCA and SLCA++ (slca_kit/alignment.py ``LowRankCovariances``): the kept eigenpairs
and diagonal residual against an eigendecomposition worked out here, draws with the stored covariance, and runs that
store, checkpoint and align with it."""
from __future__ import annotations

import pytest
import torch

from slca_kit.alignment import ClassMoments, LowRankCovariances, sample_gaussians
from slca_kit.errors import ConfigError
from slca_kit.resolve import config_from_dict
from slca_kit.trainer import Trainer

from conftest import tiny_recipe


def _covariances(dim=6, classes=2):
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(classes, dim, dim, generator=generator, dtype=torch.float64)
    return mixing @ mixing.transpose(1, 2) + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_kept_eigenpairs_and_residual_by_hand():
    covs = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    low = LowRankCovariances.from_covariances(covs, 1)
    # the top eigenpair is (4, e1); the rest's diagonal is (0, 2, 1)
    assert torch.allclose(low.values, torch.tensor([[4.0]], dtype=torch.float64))
    assert torch.allclose(low.basis[0, :, 0].abs(), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(low.residual, torch.tensor([[0.0, 2.0, 1.0]], dtype=torch.float64))
    assert torch.allclose(low.dense(), covs)


def test_the_diagonal_is_exact_and_full_rank_gives_the_covariance_back():
    covs = _covariances()
    low = LowRankCovariances.from_covariances(covs, 2)
    assert torch.allclose(low.dense().diagonal(dim1=-2, dim2=-1), covs.diagonal(dim1=-2, dim2=-1))
    values, vectors = torch.linalg.eigh(covs)
    top = (vectors[:, :, -2:] * values[:, None, -2:]) @ vectors[:, :, -2:].transpose(1, 2)
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    assert torch.allclose(low.dense()[:, off_diagonal], top[:, off_diagonal])  # off the diagonal: the top-2 part
    assert torch.allclose(LowRankCovariances.from_covariances(covs, 6).dense(), covs)
    assert low.nbytes == 2 * (6 * 2 + 2 + 6) * 8


def test_draws_have_the_low_rank_covariance():
    covs = _covariances(dim=4, classes=1)
    low = LowRankCovariances.from_covariances(covs, 2)
    means = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)
    samples, positions = sample_gaussians(means, low, 200_000, torch.Generator().manual_seed(1))
    assert positions.unique().tolist() == [0]
    assert torch.allclose(samples.mean(0), means[0], atol=0.05)
    scale = covs.diagonal(dim1=-2, dim2=-1).max()
    assert torch.allclose(torch.cov(samples.T), low.dense()[0], atol=0.02 * scale)


def _trainer(tiny_npz, folder, method="slca", **params):
    recipe = tiny_recipe(tiny_npz, folder, method=method, train={"epochs": 1})
    if method == "slca_pp":
        recipe["adapter"] = {"type": "lora", "r": 4, "lora_alpha": 3.2, "train_backbone": ["norm", "bias"]}
    recipe["method"]["params"] = params
    return Trainer(config_from_dict(recipe))


@pytest.mark.parametrize("method", ["slca", "slca_pp"])
def test_a_lowrank_run_stores_and_checkpoints_only_the_low_rank_statistics(tiny_npz, tmp_path, method):
    trainer = _trainer(tiny_npz, tmp_path, method, covariance="lowrank", covariance_rank=8)
    results = trainer.run()
    stored = trainer.method.lowrank
    assert results["complete"] and trainer.method.covs.numel() == 0
    assert stored.basis.shape == (6, 64, 8) and stored.values.shape == (6, 8) and stored.residual.shape == (6, 64)
    # the last task's classes against their covariances computed here from the final backbone's features
    classes = trainer.scenario.task_classes(2)
    features, labels = trainer.extract_features(classes, "train")
    _, covs = ClassMoments.from_features(features, labels, classes).gaussians(1e-4)
    expected = LowRankCovariances.from_covariances(covs, 8)
    assert torch.allclose(stored.values[classes].double(), expected.values, rtol=1e-4, atol=1e-6)
    assert torch.allclose(stored.dense()[classes].double(), expected.dense(), atol=1e-4)
    saved = trainer.method.state_dict()
    assert saved["covs"].numel() == 0 and set(saved["lowrank_covs"]) == {"basis", "values", "residual"}
    again = type(trainer.method)(trainer.method.params, trainer.config)
    again.load_state_dict(saved)
    assert torch.equal(again.lowrank.basis, stored.basis) and torch.equal(again.lowrank.residual, stored.residual)


def test_bad_covariance_settings_are_refused(tiny_npz, tmp_path):
    with pytest.raises(ConfigError, match="method.params.covariance: 'diagonal'"):
        _trainer(tiny_npz, tmp_path, covariance="diagonal")
    with pytest.raises(ConfigError, match="method.params.covariance_rank"):
        _trainer(tiny_npz, tmp_path, covariance="lowrank", covariance_rank=0)
