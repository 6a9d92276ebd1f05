"""MOS (slca_kit/methods/mos.py): adapter merging and the orthogonality term by hand, the self-refined retrieval and
ensemble against sun-hailong/AAAI25-MOS models/mos.py:357-403 written out, the merges a training forward pass makes,
a run whose statistics, prototypes and predictions are recomputed independently, and resume."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slca_kit.alignment import ClassMoments
from slca_kit.errors import ConfigError
from slca_kit.methods.mos import (ensemble, mean_parameters, merge_toward, orthogonality_loss,
                                  self_refined_logits)
from slca_kit.models.parallel_adapter import ParallelAdapters

from conftest import cloned_state, hooked_vit_trainer, record_after_each_task, run_interrupted_and_resumed, \
    tiny_timm_vit


def test_merge_pulls_toward_the_mean_of_the_earlier_sets_by_hand():
    earlier = [nn.Linear(1, 1), nn.Linear(1, 1)]
    current = nn.Linear(1, 1)
    with torch.no_grad():
        for module, (w, b) in zip(earlier + [current], [(1.0, 2.0), (3.0, 4.0), (10.0, 0.0)]):
            module.weight.fill_(w)
            module.bias.fill_(b)
    merge_toward(current, mean_parameters(earlier), 0.1)
    # 0.9 * 10 + 0.1 * (1 + 3) / 2 = 9.2; 0.9 * 0 + 0.1 * (2 + 4) / 2 = 0.3
    assert current.weight.item() == pytest.approx(9.2) and current.bias.item() == pytest.approx(0.3)


def test_orthogonality_term_by_hand():
    means, features = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # rows [1, 0] and [0, 1]: similarity I / 0.8, each row's own entry 1.25 against one 0
    expected = -math.log(math.exp(1.25) / (math.exp(1.25) + 1))
    assert orthogonality_loss(features, means, 0.8).item() == pytest.approx(expected)
    # without stored means the batch alone: [[2, 0], [0, 0]] / 0.8 (mos.py:351-354)
    batch = torch.tensor([[math.sqrt(2), 0.0], [0.0, 0.0]])
    expected = (-math.log(math.exp(2.5) / (math.exp(2.5) + 1)) + math.log(2)) / 2
    assert orthogonality_loss(batch, None, 0.8).item() == pytest.approx(expected)


def _official_refine_and_ensemble(orig_logits, head_of, all_features, cls2task, cur_task, max_iter, use_ensemble):
    """mos.py:364-403 for one batch: ``head_of(feature [1, d])`` is the head's logits."""
    orig_preds = torch.max(orig_logits, dim=1)[1]
    orig_idx = torch.tensor([cls2task[int(v)] for v in orig_preds])
    final_logits = []
    for x_id in range(all_features.shape[0]):
        loop_num = 0
        prev_adapter_idx = orig_idx[x_id]
        while True:
            loop_num += 1
            cur_logits = head_of(all_features[x_id, prev_adapter_idx].unsqueeze(0))
            cur_pred = torch.max(cur_logits, dim=1)[1]
            cur_adapter_idx = torch.tensor([cls2task[int(v)] for v in cur_pred])[0]
            if loop_num >= max_iter or cur_adapter_idx == prev_adapter_idx:
                break
            prev_adapter_idx = cur_adapter_idx
        final_logits.append(cur_logits)
    final_logits = torch.cat(final_logits, dim=0)
    if use_ensemble:
        return F.softmax(final_logits, dim=1) + F.softmax(orig_logits / (1 / (cur_task + 1)), dim=1)
    return final_logits


@pytest.mark.parametrize("rounds", [1, 2, 4])
def test_self_refined_retrieval_and_ensemble_match_the_official_loop(rounds):
    torch.manual_seed(0)
    tasks, per_task, dim, batch = 4, 3, 5, 64
    head = nn.Linear(dim, tasks * per_task)
    cls2task = [c // per_task for c in range(tasks * per_task)]
    features = torch.randn(batch, tasks, dim) * 3
    orig_logits = torch.randn(batch, tasks * per_task)
    with torch.no_grad():
        head_logits = head(features)
        refined = self_refined_logits(head_logits, torch.tensor(cls2task)[orig_logits.argmax(1)],
                                      torch.tensor(cls2task), rounds)
        for use_ensemble in (False, True):
            expected = _official_refine_and_ensemble(orig_logits, head, features, cls2task, tasks - 1, rounds,
                                                     use_ensemble)
            got = ensemble(refined, orig_logits, tasks) if use_ensemble else refined
            assert torch.allclose(got, expected, atol=1e-6)
    if rounds > 1:  # the test exercises moves between sets: some images end on another set than they started
        first = torch.tensor(cls2task)[orig_logits.argmax(1)]
        assert (head_logits[torch.arange(batch), first] != refined).any()


def test_a_training_forward_merges_before_every_block_and_an_evaluation_forward_does_not():
    from slca_kit.methods.mos import MOS

    vit = tiny_timm_vit()
    sets = [ParallelAdapters(vit.blocks, 64, 4, 0.1, 0.0) for _ in range(3)]
    torch.manual_seed(1)
    for adapters in sets:
        for parameter in adapters.parameters():
            parameter.data.normal_()
    for position, adapters in enumerate(sets):
        adapters.enabled = position == 2
    method = MOS(MOS.Params(), config=None)
    model = nn.Module()
    model.backbone, model.mos_adapters = vit, nn.ModuleList(sets)
    hooks = [block.register_forward_pre_hook(method._merge_hook(model, 2)) for block in vit.blocks]
    start = [p.clone() for p in sets[2].parameters()]
    target = mean_parameters(sets[:2])
    vit.eval()
    model.eval()
    vit(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(p, s) for p, s in zip(sets[2].parameters(), start))
    model.train()
    vit(torch.randn(2, 3, 32, 32))
    # two blocks: two merges, current <- target + 0.9^2 (start - target)
    for parameter, s, t in zip(sets[2].parameters(), start, target):
        assert torch.allclose(parameter, t + 0.81 * (s - t), atol=1e-6)
    for hook in hooks:
        hook.remove()


def _trainer(tiny_npz, tmp_path, **params):
    return hooked_vit_trainer(tiny_npz, tmp_path, "mos", **{"adapter_bottleneck": 4, "ca_epochs": 2,
                                                              "samples_per_class": 16, **params})


def test_run_statistics_prototypes_and_predictions_are_recomputed_independently(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path)
    initial = cloned_state(trainer.model.backbone)
    snapshots = record_after_each_task(trainer, lambda model: ([cloned_state(s) for s in model.mos_adapters],
                                                               cloned_state(model.head)))
    results = trainer.run()
    model, method = trainer.model, trainer.method
    assert all(torch.equal(v, initial[k]) for k, v in model.backbone.state_dict().items())  # the ViT never moves
    assert len(model.mos_adapters) == 3
    for task in range(3):  # set `task` trained on its task, then stayed
        sets = snapshots[task][0]
        assert any(v.abs().sum() > 0 for k, v in sets[task].items() if k.endswith("up.weight"))
        assert all(torch.equal(sets[task][k], snapshots[2][0][task][k]) for k in sets[task])
    # the aligned head is the model's head: it moved after the alignment of tasks 1 and 2
    assert len(method.alignment_losses) == 2

    def features(classes, split, adapter_set):
        for position, adapters in enumerate(model.mos_adapters):
            adapters.enabled = position == adapter_set
        return trainer.extract_features(classes, split)

    for task in range(3):
        classes = [2 * task, 2 * task + 1]
        x, y = features(classes, "train", task)
        means, covs = ClassMoments.from_features(x, y, classes).gaussians(1e-4)
        assert torch.allclose(method.means[classes], means.float(), atol=1e-5)
        assert torch.allclose(method.covs[classes], covs.float(), atol=1e-5)
        x0, y0 = features(classes, "train", 0)
        prototypes = torch.stack([x0[y0 == c].mean(0) for c in classes])
        assert torch.allclose(method.prototypes[classes], prototypes, atol=1e-5)
    test = [features(list(range(6)), "test", s) for s in range(3)]
    labels = test[0][1]
    cls2task = [c // 2 for c in range(6)]
    with torch.no_grad():
        scores = _official_refine_and_ensemble(
            F.normalize(test[0][0], dim=1) @ F.normalize(method.prototypes, dim=1).T, model.head,
            torch.stack([x for x, _ in test], dim=1), cls2task, 2, 4, True)
    assert int((scores.argmax(1) == labels).sum()) == sum(results["correct"][-1])
    assert results["tasks"][-1]["method"]["adapter_sets"] == 3


def test_resume_after_a_task_matches_uninterrupted(tiny_npz, tmp_path):
    reference, expected, resumed, results = run_interrupted_and_resumed(
        lambda folder: _trainer(tiny_npz, folder), tmp_path, after_task=1)
    assert results["correct"] == expected["correct"]
    assert torch.equal(resumed.method.prototypes, reference.method.prototypes)
    assert torch.equal(resumed.method.covs, reference.method.covs)
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.mos_adapters.parameters(),
                                                 reference.model.mos_adapters.parameters()))


@pytest.mark.parametrize("params, key", [({"adapter_momentum": 1.5}, "adapter_momentum"),
                                         ({"refine_rounds": 0}, "refine_rounds"),
                                         ({"adapter_dropout": 1.0}, "adapter_dropout")])
def test_bad_settings_are_refused(tiny_npz, tmp_path, params, key):
    with pytest.raises(ConfigError, match=key):
        _trainer(tiny_npz, tmp_path, **params)
