"""CoFiMA (slca_kit/methods/cofima.py): Fisher-weighted averaging by hand and against the official formula, the
Fisher against the official loop (IemProg/CoFiMA models/cofima.py:199-221: backward, p.grad squared, mean over
batches, clamp), the averaging inside a run, and resume from an epoch checkpoint."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slca_kit.methods.cofima import fisher_weighted_average
from slca_kit.resolve import config_from_dict
from slca_kit.trainer import Trainer

from conftest import Interrupted, interrupt_before_epoch, tiny_recipe


def test_fisher_weighted_average_by_hand():
    merged = fisher_weighted_average(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0]),
                                     torch.tensor([1e-4, 0.0]), torch.tensor([3e-4, 0.0]), alpha=0.4)
    # (0.6 * 1e-4 * 1 + 0.4 * 3e-4 * 3) / (0.6 * 1e-4 + 0.4 * 3e-4) = 4.2 / 1.8; no Fisher: 0.6 * 1 + 0.4 * 3
    assert torch.allclose(merged, torch.tensor([4.2 / 1.8, 1.8]))


def test_two_tiny_models_average_as_the_official_interpolate_weights():
    torch.manual_seed(0)
    old, new = nn.Linear(3, 2), nn.Linear(3, 2)
    fisher_old = {k: torch.rand_like(v) * 1e-4 for k, v in old.state_dict().items()}
    fisher_new = {k: torch.rand_like(v) * 1e-4 for k, v in new.state_dict().items()}
    alpha = 0.5
    for key, theta0 in old.state_dict().items():  # cofima.py:50-67, written out
        theta1 = new.state_dict()[key]
        expected = (((1 - alpha) * (fisher_old[key] * theta0) + alpha * (fisher_new[key] * theta1))
                    / ((1 - alpha) * fisher_old[key] + alpha * fisher_new[key]))
        ours = fisher_weighted_average(theta0, theta1, fisher_old[key], fisher_new[key], alpha)
        assert torch.allclose(ours, expected, rtol=1e-6), key


def _trainer(tiny_npz, tmp_path, train=None, **params):
    recipe = tiny_recipe(tiny_npz, tmp_path, method="cofima")
    recipe["method"]["params"] = {"ca_epochs": 1, "samples_per_class": 8, "fisher_batch_size": 16,
                                  "backbone_lr_scale": 0.1, **params}
    recipe["train"].update(train or {})
    return Trainer(config_from_dict(recipe))


def test_fisher_matches_the_official_backward_loop(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, fisher_max=1e-3)
    trainer.run()
    model, method = trainer.model, trainer.method
    ctx = trainer.context(2)
    ours = method.fisher(model, ctx)
    # the official loop: per batch zero_grad, backward of the cross-entropy over all seen logits, add grad^2
    tracked = {n: p for n, p in model.backbone.named_parameters() if p.requires_grad}
    sums, batches = {n: torch.zeros_like(p) for n, p in tracked.items()}, 0
    for images, labels in ctx.iterate_images(ctx.scenario.task_classes(2), "train", 16):
        model.zero_grad()
        F.cross_entropy(model(images)[:, :6], labels).backward()
        for n, p in tracked.items():
            sums[n] += p.grad.pow(2)
        batches += 1
    assert batches == 2 and set(ours) == set(tracked) and len(ours) > 10
    for n in tracked:
        assert torch.allclose(ours[n], torch.clamp(sums[n] / batches, max=1e-3), rtol=1e-5, atol=1e-12), n
    assert max(f.max().item() for f in ours.values()) == pytest.approx(1e-3)  # the clamp is reached


def test_each_task_after_the_first_averages_the_backbone(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path)
    method = trainer.method
    seen = []
    original = method._average

    def average(model, fisher):
        trained = {n: p.detach().clone() for n, p in method._tracked(model).items()}
        previous = {n: v.clone() for n, v in method.previous_backbone.items()}
        previous_fisher = {n: v.clone() for n, v in method.previous_fisher.items()}
        original(model, fisher)
        seen.append((trained, previous, previous_fisher, {n: f.clone() for n, f in fisher.items()},
                     {n: p.detach().clone() for n, p in method._tracked(model).items()}))

    method._average = average
    trainer.run()
    assert len(seen) == 2  # tasks 1 and 2, not task 0
    for trained, previous, previous_fisher, fisher, merged in seen:
        moved = 0
        for name in trained:
            expected = (((0.6 * previous_fisher[name] * previous[name] + 0.4 * fisher[name] * trained[name])
                         / (0.6 * previous_fisher[name] + 0.4 * fisher[name])))
            assert torch.allclose(merged[name], expected, rtol=1e-5, atol=1e-7), name
            moved += int(not torch.equal(merged[name], trained[name]))
        assert moved > 10  # the average really changed the trained backbone
    # the stored previous backbone is the final (averaged) one
    for name, value in method.previous_backbone.items():
        assert torch.equal(value, dict(trainer.model.backbone.named_parameters())[name].detach())


def test_resume_from_an_epoch_checkpoint_matches_uninterrupted(tiny_npz, tmp_path):
    train = {"checkpoint_every_epoch": True, "keep_checkpoints": 10}
    reference = _trainer(tiny_npz, tmp_path / "ref", train)
    expected = reference.run()
    cut = _trainer(tiny_npz, tmp_path / "cut", train)
    interrupt_before_epoch(cut, task=1, epoch=1)
    with pytest.raises(Interrupted):
        cut.run()
    resumed = _trainer(tiny_npz, tmp_path / "cut", train)
    results = resumed.run(resume=True)
    assert results["correct"] == expected["correct"]
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    for name, value in reference.method.previous_fisher.items():
        assert torch.equal(value, resumed.method.previous_fisher[name]), name
