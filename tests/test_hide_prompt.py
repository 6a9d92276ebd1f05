"""HiDe-Prompt (slca_kit/methods/hide_prompt.py): k-means centroids and their draws by hand, the task-identity MLP
against thu-ml/HiDe-Prompt's ``MlpMapping`` written out, per-image prompts and the prompt momentum, a run whose
statistics, task identities and predictions are recomputed independently, resume, and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slca_kit.alignment import ClassMoments
from slca_kit.centroids import Centroids, ClassGaussians, kmeans
from slca_kit.errors import ConfigError
from slca_kit.models.task_identity import TaskIdentityHead

from conftest import hooked_vit_trainer, record_after_each_task, run_interrupted_and_resumed

PARAMS = {"e_layers": [0, 1], "centroids": 3, "ca_epochs": 2, "ca_samples_per_centroid": 8, "tii_epochs": 2,
          "tii_batch_size": 8, "tii_lr": 0.01, "tii_ca_lr": 0.01, "tii_ca_samples_per_centroid": 4}


def _trainer(tiny_npz, folder, **params):
    return hooked_vit_trainer(tiny_npz, folder, "hide_prompt", **{**PARAMS, **params})


def test_kmeans_separates_two_blobs_and_centroids_are_member_means_and_population_variances():
    points = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 10.0], [12.0, 10.0], [11.0, 13.0]])
    labels = kmeans(points, 2, torch.Generator().manual_seed(0))
    assert labels[0] == labels[1] and labels[2] == labels[3] == labels[4] and labels[0] != labels[2]
    fitted = Centroids.fit(points, torch.zeros(5, dtype=torch.long), [0], 2, 1e-4, torch.Generator().manual_seed(0))
    order = fitted.means[:, 0].argsort()
    # blob 1: mean (0, 1), numpy var (0, 1); blob 2: mean (11, 11), var ((1+1+0)/3, (1+1+4)/3)
    assert torch.allclose(fitted.means[order], torch.tensor([[0.0, 1.0], [11.0, 11.0]]))
    assert torch.allclose(fitted.variances[order], torch.tensor([[0.0, 1.0], [2 / 3, 2.0]]))
    assert fitted.labels.tolist() == [0, 0]


def test_centroid_draws_skip_zero_variance_components_and_have_the_stored_spread():
    centroids = Centroids(means=torch.tensor([[1.0, -1.0], [5.0, 5.0]]),
                          variances=torch.tensor([[4.0, 0.25], [0.0, 0.0]]), labels=torch.tensor([3, 7]), ridge=0.0)
    samples, labels = centroids.sample(20000, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert labels.unique().tolist() == [3] and samples.shape == (20000, 2)  # the single-member centroid is left out
    assert torch.allclose(samples.mean(0), torch.tensor([1.0, -1.0]), atol=0.05)
    assert torch.allclose(samples.std(0), torch.tensor([2.0, 0.5]), atol=0.03)


def test_covariance_statistics_come_from_class_moments():
    features = torch.randn(40, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.tensor([0, 1] * 20)
    gaussians = ClassGaussians.from_moments(ClassMoments.from_features(features, labels, [0, 1]), [0, 1], 1e-4)
    for k in (0, 1):
        members = features[labels == k]
        cov = torch.cov(members.T) + 1e-4 * torch.eye(3, dtype=torch.float64)
        assert torch.allclose(gaussians.means[k].double(), members.mean(0), atol=1e-6)
        assert torch.allclose((gaussians.chol[k] @ gaussians.chol[k].T).double(), cov, atol=1e-5)


def test_task_identity_head_is_the_official_mlp_mapping_and_linear_head():
    torch.manual_seed(0)
    head = TaskIdentityHead(4, [2], 5)
    x = torch.randn(3, 4)
    first, second = head.layers[0][0], head.layers[1][0]
    # MlpMapping.forward: Linear(4, 8) GELU Dropout, Linear(8, 4) Dropout, + x, LayerNorm (hide_prompt_vit.py:363-369)
    mapped = F.layer_norm(second(F.gelu(first(x))) + x, (4,), head.norm.weight, head.norm.bias)
    assert torch.allclose(head(x), head.classifier(mapped), atol=1e-6)
    assert first.weight.shape == (8, 4) and (first.bias == 0).all() and head.classifier.weight.std() < 0.05


def test_each_image_takes_its_own_prompt_and_training_blends_the_earlier_ones(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path)
    model, method = trainer.model, trainer.method
    method.grow(model, trainer.context(0))
    model.eval()
    with torch.no_grad():
        model.hide_prompts.e.normal_()
    images = torch.rand(2, 3, 32, 32)
    together = method.prompted_features(model, images, torch.tensor([0, 2]))
    alone = torch.cat([method.prompted_features(model, images[:1], torch.tensor([0])),
                       method.prompted_features(model, images[1:], torch.tensor([2]))])
    assert torch.allclose(together, alone, atol=1e-5) and not torch.allclose(together[0], together[1])
    blended = method.prompted_features(model, images, torch.tensor([2, 2]), blend=True)
    with torch.no_grad():  # (1 - m) P_2 + m mean(P_0, P_1)
        e = model.hide_prompts.e
        e[:, :, 2] = 0.99 * e[:, :, 2] + 0.01 * (e[:, :, 0] + e[:, :, 1]) / 2
    assert torch.allclose(blended, method.prompted_features(model, images, torch.tensor([2, 2])), atol=1e-5)


def test_run_statistics_task_identities_and_predictions_are_recomputed_independently(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path)
    trainer.config.train.weight_decay = 0.0  # as the official recipes: only the current prompt then moves
    prompts = record_after_each_task(trainer, lambda model: model.hide_prompts.e.detach().clone())
    results = trainer.run()
    model, method = trainer.model, trainer.method
    model.eval()
    # after task 1 (of 0..2) the new prompt moved 1 % toward the mean of the earlier ones (engine :315-324)
    assert not torch.equal(prompts[1][:, :, 1], prompts[0][:, :, 1])
    assert torch.equal(prompts[2][:, :, :2], prompts[1][:, :, :2])  # earlier prompts stay
    # statistics: the last task's classes, its own prompt (test transform), k-means seeded from (seed, task)
    classes, seed = trainer.scenario.task_classes(2), trainer.config.train.seed * 1_000 + 2
    for source, stored in (("own_prompt", method.prompt_statistics), ("frozen", method.identity_statistics)):
        method._feature_source = source
        features, labels, _ = trainer.gather_features(classes, "train")
        method._feature_source = None
        expected = Centroids.fit(features, labels, classes, 3, 1e-4, torch.Generator().manual_seed(seed))
        assert stored.means.shape[0] == 3 * 6 and torch.equal(stored.labels[-6:], expected.labels[-6:])
        assert torch.allclose(stored.means[-6:], expected.means, atol=1e-5), source
        assert torch.allclose(stored.variances[-6:], expected.variances, atol=1e-5), source
    # predictions: the task-identity classifier's class names the task, whose prompt gives the head's logits
    images, targets = next(trainer.iterate_images(list(range(6)), "test", 36))
    with torch.no_grad():
        identity = model.hide_identity(method.prompted.query(images))[:, :6].argmax(1)
        tasks = torch.as_tensor(trainer.scenario.class_task_ids(), dtype=torch.long)[identity]
        logits = model.head(method.prompted_features(model, images, tasks))
        assert torch.allclose(method.predict(model, images, trainer.context(2)), logits, atol=1e-5)
    class_task = torch.as_tensor(trainer.scenario.class_task_ids(), dtype=torch.long)
    accuracy = 100.0 * float((tasks == class_task[targets]).float().mean())
    assert results["tasks"][-1]["method"]["task_identity_accuracy"] == pytest.approx(accuracy, abs=0.01)
    # alignment: from the second task, both classifiers for ca_epochs epochs
    assert [len(a["head"]) for a in method.alignment_losses] == [2, 2]
    assert len(method.identity_losses) == 3 and all(len(x) == 2 for x in method.identity_losses)


def test_resume_after_a_task_matches_uninterrupted(tiny_npz, tmp_path):
    reference, expected, resumed, results = run_interrupted_and_resumed(
        lambda folder: _trainer(tiny_npz, folder), tmp_path, after_task=0)
    assert results["accuracy_matrix"] == expected["accuracy_matrix"]
    assert torch.allclose(resumed.method.prompt_statistics.means, reference.method.prompt_statistics.means)
    identity, expected_identity = resumed.model.hide_identity, reference.model.hide_identity
    assert torch.allclose(identity.classifier.weight, expected_identity.classifier.weight)


@pytest.mark.parametrize("params, key", [({"statistics": "gmm"}, "statistics"), ({"centroids": 0}, "centroids"),
                                         ({"prompt_momentum": 2.0}, "prompt_momentum"), ({"e_layers": []}, "e_layers")])
def test_bad_settings_are_refused(tiny_npz, tmp_path, params, key):
    with pytest.raises(ConfigError, match=f"method.params.{key}"):
        _trainer(tiny_npz, tmp_path, **params)
