"""EASE (slca_kit/methods/ease.py): the prototype complement on 2-d toy prototypes by hand and against the official
loops (sun-hailong/CVPR24-Ease models/ease.py:179-209, written out), the reweighted logits against
backbone/linears.py:45-93 written out, a run whose prototypes are recomputed independently, and resume."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slca_kit.errors import ConfigError
from slca_kit.methods.ease import complement_prototypes, reweighted_logits

from conftest import cloned_state, hooked_vit_trainer, record_after_each_task, run_interrupted_and_resumed


def test_complement_on_two_d_prototypes_by_hand():
    # task 0: class 0; task 1: classes 1, 2; blocks of 2 dims: block 0 (adapter set 0), block 1 (set 1)
    weight = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                           [1.0, 0.0, 0.0, 2.0],
                           [0.0, 1.0, 2.0, 0.0]])
    done = complement_prototypes(weight, [slice(0, 1), slice(1, 3)], dim=2, first_block=0)
    # in block 0, class 0 has cosine 1 with class 1 and 0 with class 2: softmax weights e/(e+1), 1/(e+1)
    e = math.e
    assert torch.allclose(done[0, 2:], torch.tensor([2 / (e + 1), 2 * e / (e + 1)]))
    assert torch.equal(done[1:], weight[1:]) and torch.equal(done[0, :2], weight[0, :2])


def _official_cls_range(task_id, init_cls, inc):
    """ease.py:49-58 ``get_cls_range``."""
    start_cls = 0 if task_id == 0 else init_cls + (task_id - 1) * inc
    return start_cls, init_cls if task_id == 0 else start_cls + inc


def _official_solve_sim_reset(weight, init_cls, inc, cur_task, dim, use_init_ptm):
    """ease.py:176-226, moni_adam false."""
    weight = weight.clone()
    total = init_cls + cur_task * inc
    for task_id in range(cur_task):
        range_dim = range(task_id + 2, cur_task + 2) if use_init_ptm else range(task_id + 1, cur_task + 1)
        for dim_id in range_dim:
            start_cls, end_cls = _official_cls_range(task_id, init_cls, inc)
            start_dim, end_dim = dim_id * dim, (dim_id + 1) * dim
            if use_init_ptm:
                start_cls_old = init_cls + (dim_id - 2) * inc
                start_dim_old, end_dim_old = (task_id + 1) * dim, (task_id + 2) * dim
            else:
                start_cls_old = init_cls + (dim_id - 1) * inc
                start_dim_old, end_dim_old = task_id * dim, (task_id + 1) * dim
            a = weight[start_cls_old:total, start_dim_old:end_dim_old]
            b = weight[start_cls_old:total, start_dim:end_dim]
            a_hat = weight[start_cls:end_cls, start_dim_old:end_dim_old]
            similarity = torch.zeros(len(a_hat), len(a))
            for i in range(len(a_hat)):
                for j in range(len(a)):
                    similarity[i][j] = torch.cosine_similarity(a_hat[i], a[j], dim=0)
            similarity = F.softmax(similarity, dim=1)
            b_hat = torch.zeros(a_hat.shape[0], b.shape[1])
            for i in range(len(a_hat)):
                for j in range(len(a)):
                    b_hat[i] += similarity[i][j] * b[j]
            weight[start_cls:end_cls, start_dim:end_dim] = b_hat
    return weight


def _random_prototypes(seed, init_cls, inc, tasks, dim, use_init_ptm):
    """Random merged-head weights [classes, blocks * dim] and each task's rows, B``init_cls`` Inc``inc``."""
    torch.manual_seed(seed)
    blocks = tasks + int(use_init_ptm)
    weight = torch.randn(init_cls + (tasks - 1) * inc, blocks * dim)
    rows = [slice(0, init_cls)] + [slice(init_cls + (t - 1) * inc, init_cls + t * inc) for t in range(1, tasks)]
    return weight, rows


@pytest.mark.parametrize("use_init_ptm", [False, True])
def test_complement_matches_the_official_loops(use_init_ptm):
    init_cls, inc, tasks, dim = 3, 2, 4, 5
    weight, rows = _random_prototypes(0, init_cls, inc, tasks, dim, use_init_ptm)
    expected = _official_solve_sim_reset(weight, init_cls, inc, tasks - 1, dim, use_init_ptm)
    done = complement_prototypes(weight, rows, dim, first_block=int(use_init_ptm))
    assert torch.allclose(done, expected, atol=1e-6)
    assert not torch.allclose(done, weight)


def _official_forward_reweight(features, weight, cur_task, alpha, beta, init_cls, inc, out_dim, use_init_ptm):
    """backbone/linears.py:45-93 (sigma 1, no proxies)."""
    out_all = []
    for i in range(cur_task + 1):
        start_cls, end_cls = _official_cls_range(i, init_cls, inc)
        out = 0.0
        for j in range(weight.shape[1] // out_dim):
            if use_init_ptm and j == 0:
                out += beta * F.linear(F.normalize(features[:, 0:out_dim], p=2, dim=1),
                                       F.normalize(weight[start_cls:end_cls, 0:out_dim], p=2, dim=1))
                continue
            input1 = F.normalize(features[:, j * out_dim:(j + 1) * out_dim], p=2, dim=1)
            weight1 = F.normalize(weight[start_cls:end_cls, j * out_dim:(j + 1) * out_dim], p=2, dim=1)
            own = (j == i + 1) if use_init_ptm else (j == i)
            out1 = F.linear(input1, weight1) if own else alpha * F.linear(input1, weight1) / cur_task
            out += out1
        out_all.append(out)
    return torch.cat(out_all, dim=1)


@pytest.mark.parametrize("use_init_ptm", [False, True])
def test_reweighted_logits_match_the_official_head(use_init_ptm):
    init_cls, inc, tasks, dim = 3, 2, 3, 4
    weight, rows = _random_prototypes(1, init_cls, inc, tasks, dim, use_init_ptm)
    features = torch.randn(6, weight.shape[1])
    expected = _official_forward_reweight(features, weight, tasks - 1, 0.1, 0.5, init_cls, inc, dim, use_init_ptm)
    logits = reweighted_logits(features, weight, rows, dim, 0.1, 0.5, use_init_ptm)
    assert torch.allclose(logits, expected, atol=1e-6)


def _trainer(tiny_npz, tmp_path, **params):
    return hooked_vit_trainer(tiny_npz, tmp_path, "ease", **{"adapter_bottleneck": 8, **params})


def test_each_task_trains_its_own_adapters_and_prototypes_are_recomputed_independently(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path)
    initial = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    snapshots = record_after_each_task(trainer, lambda model: [cloned_state(s) for s in model.ease_adapters])
    results = trainer.run()
    model, method = trainer.model, trainer.method
    assert all(torch.equal(v, initial[k]) for k, v in model.backbone.state_dict().items())  # the ViT never moves
    assert len(model.ease_adapters) == 3
    for task in range(3):  # set `task` trained on its task (away from its zero up-projection), then stayed
        assert any(v.abs().sum() > 0 for k, v in snapshots[task][task].items() if k.endswith("up.weight"))
        assert all(torch.equal(snapshots[task][task][k], snapshots[2][task][k]) for k in snapshots[task][task])
    dim, rows = model.backbone.num_features, [slice(0, 2), slice(2, 4), slice(4, 6)]

    def features(classes, split, adapter_set):
        for position, adapters in enumerate(model.ease_adapters):
            adapters.enabled = position == adapter_set
        return trainer.extract_features(classes, split)

    real = torch.zeros(6, 3 * dim)
    for task in range(3):
        classes = list(range(2 * task, 2 * task + 2))
        for block in range(task + 1):
            x, y = features(classes, "train", block)
            real[rows[task], block * dim:(block + 1) * dim] = torch.stack([x[y == c].mean(0) for c in classes])
    for task in range(3):  # real blocks as computed here; the others are the complement of these
        assert torch.allclose(method.prototypes[rows[task], :(task + 1) * dim], real[rows[task], :(task + 1) * dim],
                              atol=1e-5)
    assert torch.allclose(method.prototypes, complement_prototypes(real, rows, dim, 0), atol=1e-5)
    test = [features(list(range(6)), "test", block) for block in range(3)]
    logits = reweighted_logits(torch.cat([x for x, _ in test], 1), method.prototypes, rows, dim, 0.1, 0.0, False)
    assert int((logits.argmax(1) == test[0][1]).sum()) == sum(results["correct"][-1])
    assert results["tasks"][-1]["method"]["adapter_sets"] == 3


def test_resume_after_a_task_matches_uninterrupted(tiny_npz, tmp_path):
    reference, expected, resumed, results = run_interrupted_and_resumed(
        lambda folder: _trainer(tiny_npz, folder), tmp_path, after_task=1)
    assert results["correct"] == expected["correct"]
    assert torch.equal(resumed.method.prototypes, reference.method.prototypes)


@pytest.mark.parametrize("params, key", [({"adapter_dropout": 1.0}, "adapter_dropout"),
                                         ({"adapter_bottleneck": 0}, "adapter_bottleneck")])
def test_bad_settings_are_refused(tiny_npz, tmp_path, params, key):
    with pytest.raises(ConfigError, match=key):
        _trainer(tiny_npz, tmp_path, **params)
