"""FeCAM (slca_kit/methods/fecam.py) against the official ViT script's numpy functions (dipamgoswami/FeCAM
FeCAM_vit_cifar100.py:29-57), written out here, and the whole pipeline against that script's loop on the same
features; resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slca_kit.methods.fecam import correlation_matrices, mahalanobis_distances, shrink_covariances
from slca_kit.resolve import config_from_dict
from slca_kit.trainer import Trainer

from conftest import run_interrupted_and_resumed, tiny_recipe


def official_shrink_cov(cov, alpha1, alpha2):
    diag_mean = np.mean(np.diagonal(cov))
    off_diag = np.copy(cov)
    np.fill_diagonal(off_diag, 0.0)
    mask = off_diag != 0.0
    off_diag_mean = (off_diag * mask).sum() / mask.sum()
    iden = np.eye(cov.shape[0])
    return cov + (alpha1 * diag_mean * iden) + (alpha2 * off_diag_mean * (1 - iden))


def official_normalize_cov(cov):
    sd = np.sqrt(np.diagonal(cov))
    return cov / (np.matmul(np.expand_dims(sd, 1), np.expand_dims(sd, 0)))


def official_mahalanobis(dist, cov):
    return np.diagonal(np.matmul(np.matmul(dist, np.linalg.pinv(cov)), dist.T), 0)


@pytest.mark.parametrize("alphas", [(1.0, 0.0), (10.0, 10.0)])
def test_shrinkage_and_normalisation_match_the_official_functions(alphas):
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(3, 20, 5))
    covs = np.stack([np.cov(s.T) for s in samples])
    shrunk = shrink_covariances(torch.from_numpy(covs), *alphas)
    expected = np.stack([official_shrink_cov(c, *alphas) for c in covs])
    assert np.allclose(shrunk.numpy(), expected)
    assert np.allclose(correlation_matrices(shrunk).numpy(), np.stack([official_normalize_cov(c) for c in expected]))


def test_mahalanobis_matches_the_official_distance():
    rng = np.random.default_rng(1)
    features, means = rng.normal(size=(4, 5)), rng.normal(size=(3, 5))
    covs = np.stack([np.cov(rng.normal(size=(9, 5)).T) + np.eye(5) for _ in range(3)])
    ours = mahalanobis_distances(torch.from_numpy(features), torch.from_numpy(means),
                                 torch.linalg.pinv(torch.from_numpy(covs)))
    expected = np.stack([official_mahalanobis(features - means[c], covs[c]) for c in range(3)]).T
    assert np.allclose(ours.numpy(), expected)


def _trainer(tiny_npz, tmp_path, **params):
    recipe = tiny_recipe(tiny_npz, tmp_path, method="fecam", backbone={"replace_final_norm": False})
    recipe["method"]["params"] = {"shrink_diagonal": 10.0, "shrink_off_diagonal": 10.0, **params}
    return Trainer(config_from_dict(recipe))


def test_pipeline_matches_the_official_loop_on_the_same_features(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path)
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    results = trainer.run()
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.backbone.state_dict().items())  # frozen
    classes = list(range(6))
    train_x, train_y = trainer.extract_features(classes, "train")
    test_x, test_y = trainer.extract_features(classes, "test")
    train_x, test_x = F.normalize(train_x.double(), dim=1).numpy(), F.normalize(test_x.double(), dim=1).numpy()
    means, covs = [], []
    for c in classes:  # FeCAM_vit_cifar100.py:81-88
        means.append(train_x[train_y.numpy() == c].mean(0))
        covs.append(official_normalize_cov(official_shrink_cov(np.cov(train_x[train_y.numpy() == c].T), 10, 10)))
    distances = np.stack([official_mahalanobis(test_x - means[c], covs[c]) for c in classes]).T
    predicted = distances.argmin(1)
    assert int((predicted == test_y.numpy()).sum()) == sum(results["correct"][-1])
    assert np.allclose(trainer.method.means.numpy(), np.stack(means), atol=1e-6)


def test_resume_after_a_task_matches_uninterrupted(tiny_npz, tmp_path):
    reference, expected, resumed, results = run_interrupted_and_resumed(
        lambda folder: _trainer(tiny_npz, folder), tmp_path, after_task=1)
    assert results["correct"] == expected["correct"]
    assert torch.equal(resumed.method.precisions, reference.method.precisions)
