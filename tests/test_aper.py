"""APER (slca_kit/methods/aper.py): the adapters switched off give the pretrained ViT, prototypes are the class means
of [pretrained, adapted] features computed independently (a second ViT without hooks), prediction is the nearest
prototype by cosine, and resume."""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from slca_kit.models.parallel_adapter import ParallelAdapters

from conftest import TINY_VIT, hooked_vit_trainer, run_interrupted_and_resumed, tiny_timm_vit


def test_disabled_adapters_give_the_pretrained_vit():
    vit = tiny_timm_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = vit(x)
        adapters = ParallelAdapters(vit.blocks, TINY_VIT["embed_dim"], bottleneck=4, scale=0.1, dropout=0.1).eval()
        for adapter in adapters.adapters:
            adapter.up.weight.normal_()
        adapted = vit(x)
        with adapters.disabled():
            assert torch.equal(vit(x), plain)
        assert torch.equal(vit(x), adapted) and not torch.allclose(adapted, plain, atol=1e-3)


def _trainer(tiny_npz, tmp_path, **params):
    return hooked_vit_trainer(tiny_npz, tmp_path, "aper", **{"adapter_bottleneck": 8, **params})


def test_prototypes_are_class_means_of_pretrained_and_adapted_features(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path)
    initial = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    results = trainer.run()
    model, method = trainer.model, trainer.method
    assert all(torch.equal(v, initial[k]) for k, v in model.backbone.state_dict().items())  # the ViT never moves
    assert any(a.up.weight.abs().sum() > 0 for a in model.first_session_tuner.adapters)  # first session trained
    pretrained = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT).eval()
    pretrained.load_state_dict(initial)  # an independent copy without hooks
    classes = list(range(6))

    def both(split):
        adapted, labels = trainer.extract_features(classes, split)  # through the hooked ViT
        images = torch.cat([x for x, _ in trainer.context(2).iterate_images(classes, split, 64)])
        with torch.no_grad():
            plain = pretrained(images)
        return torch.cat([plain, adapted], 1), labels

    train_x, train_y = both("train")
    expected = torch.stack([train_x[train_y == c].mean(0) for c in classes])
    assert method.prototypes.shape == (6, 2 * TINY_VIT["embed_dim"])
    assert torch.allclose(method.prototypes, expected, atol=1e-5)
    test_x, test_y = both("test")
    predicted = (F.normalize(test_x, dim=1) @ F.normalize(expected, dim=1).T).argmax(1)
    assert int((predicted == test_y).sum()) == sum(results["correct"][-1])


def test_without_a_first_session_it_is_simplecil(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, first_session="none")
    trainer.run()
    features, labels = trainer.extract_features(list(range(6)), "train")
    expected = torch.stack([features[labels == c].mean(0) for c in range(6)])
    assert torch.allclose(trainer.method.prototypes, expected, atol=1e-5)


def test_resume_after_a_task_matches_uninterrupted(tiny_npz, tmp_path):
    # with deep prompts, the first-session module RanPAC's resume test does not cover
    reference, expected, resumed, results = run_interrupted_and_resumed(
        lambda folder: _trainer(tiny_npz, folder, first_session="vpt_deep"), tmp_path, after_task=0)
    assert results["correct"] == expected["correct"]
    assert torch.equal(resumed.method.prototypes, reference.method.prototypes)
    assert torch.equal(resumed.model.first_session_tuner.prompts, reference.model.first_session_tuner.prompts)
