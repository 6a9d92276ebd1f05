"""SD-LoRA (slca_kit/methods/sd_lora.py, models/decoupled_lora.py): the qkv hook computes WuYichen-97/SD-Lora-CL
backbone/lora.py ``_LoRA_qkv_timm_train.forward`` written out, the magnitude / direction split equals the plain LoRA
delta, a run freezes earlier directions and retrains every magnitude, SD-LoRA-RR's ranks, resume and bad input;
SD-LoRA-KD's least-squares absorption by hand, against a dense solve, and in a run."""
from __future__ import annotations

import pytest
import torch

from slca_kit.errors import ConfigError
from slca_kit.models.decoupled_lora import DecoupledLoRA

from conftest import (TINY_VIT, cloned_state, hooked_vit_trainer, record_after_each_task,
                      run_interrupted_and_resumed, tiny_timm_vit)


def _vit_with_two_tasks():
    vit = tiny_timm_vit()
    lora = DecoupledLoRA(vit.blocks, magnitude_init=0.8)
    lora.add_task(rank=3)
    lora.add_task(rank=2)  # SD-LoRA-RR: a later task may have a lower rank
    with torch.no_grad():
        for up in lora.up:
            up.normal_()
        lora.magnitudes[0].fill_(1.7)
    return vit, lora


def test_the_hook_computes_the_official_qkv_update():
    vit, lora = _vit_with_two_tasks()
    x = torch.randn(2, 5, TINY_VIT["embed_dim"])
    dim = TINY_VIT["embed_dim"]
    qkv = vit.blocks[1].attn.qkv
    with torch.no_grad():
        hooked = qkv(x)
        with lora.disabled():
            plain = qkv(x)
        # lora.py:153-194: earlier tasks' B A x over ||B||_F ||A||_F times their magnitude, the current one's
        # B A x times its magnitude, added to the query (first dim outputs) and value (last dim outputs) slices
        expected = plain.clone()
        for which, columns in ((0, slice(0, dim)), (1, slice(2 * dim, 3 * dim))):
            a0, b0 = lora.down[0][1, which], lora.up[0][1, which]
            a1, b1 = lora.down[1][1, which], lora.up[1][1, which]
            earlier = 1.7 * (x @ a0.T @ b0.T) / (torch.norm(b0) * torch.norm(a0))
            expected[..., columns] += earlier + 0.8 * (x @ a1.T @ b1.T)
    assert torch.allclose(hooked, expected, atol=1e-5)
    assert torch.equal(hooked[..., dim:2 * dim], plain[..., dim:2 * dim])  # keys untouched


def test_magnitude_times_normalised_direction_is_the_plain_lora_delta():
    vit, lora = _vit_with_two_tasks()
    x = torch.randn(4, TINY_VIT["embed_dim"])
    a, b = lora.down[0][0, 0], lora.up[0][0, 0]
    with torch.no_grad():
        lora.magnitudes[0].fill_(float(torch.norm(b) * torch.norm(a)))  # m = ||B|| ||A||
        lora.magnitudes[1].zero_()
        assert torch.allclose(lora.update(0, 0, x), x @ a.T @ b.T, atol=1e-5)  # B A x, the plain LoRA update


def test_lora_starts_as_the_pretrained_vit_and_detaches():
    vit = tiny_timm_vit()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = vit(images)
        lora = DecoupledLoRA(vit.blocks, magnitude_init=0.8)
        lora.add_task(rank=4)
        assert torch.equal(vit(images), plain)  # B = 0
        lora.up[0].normal_()
        assert not torch.allclose(vit(images), plain, atol=1e-3)
        lora.remove()
        assert torch.equal(vit(images), plain)


def _trainer(tiny_npz, tmp_path, **params):
    return hooked_vit_trainer(tiny_npz, tmp_path, "sd_lora", **{"rank": 4, **params})


def test_earlier_directions_freeze_and_every_magnitude_retrains_from_its_start(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, rank_reduction=[[2, 2]])
    initial = cloned_state(trainer.model.backbone)
    after = record_after_each_task(trainer, lambda model: cloned_state(model.sd_lora))
    results = trainer.run()
    model = trainer.model
    assert all(torch.equal(v, initial[k]) for k, v in model.backbone.state_dict().items())  # the ViT never moves
    assert [after[2][f"down.{t}"].shape[2] for t in range(3)] == [4, 4, 2]  # the RR schedule
    for task in range(3):
        assert after[task][f"up.{task}"].abs().sum() > 0  # trained away from B = 0 on its task
        for later in range(task + 1, 3):  # then frozen
            assert torch.equal(after[task][f"up.{task}"], after[later][f"up.{task}"])
            assert torch.equal(after[task][f"down.{task}"], after[later][f"down.{task}"])
    magnitudes = [[float(after[t][f"magnitudes.{i}"]) for i in range(t + 1)] for t in range(3)]
    assert all(m != pytest.approx(0.8, abs=1e-7) for m in magnitudes[2])  # all trained on the last task
    summary = results["tasks"][2]["method"]
    assert summary["rank"] == 2 and summary["magnitudes"] == pytest.approx(magnitudes[2], abs=1e-6)
    # the test logits are the linear heads' over the hooked ViT's features
    images = torch.cat([x for x, _ in trainer.iterate_images(list(range(6)), "test", 64)])
    with torch.no_grad():
        logits = model.head(model.features(images))
    labels = torch.cat([y for _, y in trainer.iterate_images(list(range(6)), "test", 64)])
    assert int((logits.argmax(1) == labels).sum()) == sum(results["correct"][-1])


def test_resume_after_a_task_matches_uninterrupted(tiny_npz, tmp_path):
    reference, expected, resumed, results = run_interrupted_and_resumed(
        lambda folder: _trainer(tiny_npz, folder), tmp_path, after_task=1)
    assert results["correct"] == expected["correct"]
    for key, value in reference.model.sd_lora.state_dict().items():
        assert torch.equal(resumed.model.sd_lora.state_dict()[key], value), key


@pytest.mark.parametrize("params, key", [({"rank": 0}, "rank"),
                                         ({"rank_reduction": [[4, 8], [2, 6]]}, "rank_reduction"),
                                         ({"rank_reduction": [[4]]}, "rank_reduction"),
                                         ({"kd_threshold": -1e-3}, "kd_threshold"),
                                         ({"kd_threshold": float("nan")}, "kd_threshold")])
def test_bad_settings_are_refused(tiny_npz, tmp_path, params, key):
    with pytest.raises(ConfigError, match=key):
        _trainer(tiny_npz, tmp_path, **params)


def _absorbable_lora():
    """Three tasks of ranks 2, 2, 4 whose third direction on block 0's query slice is 0.5 B0 A0 - 0.3 B1 A1
    (B2 = [0.5 B0, -0.3 B1], A2 = [A0; A1]) and random everywhere else."""
    lora = DecoupledLoRA(tiny_timm_vit().blocks, magnitude_init=0.8)
    for rank in (2, 2, 4):
        lora.add_task(rank)
    with torch.no_grad():
        for up in lora.up:
            up.normal_()
        lora.down[2][0, 0] = torch.cat([lora.down[0][0, 0], lora.down[1][0, 0]])
        lora.up[2][0, 0] = torch.cat([0.5 * lora.up[0][0, 0], -0.3 * lora.up[1][0, 0]], dim=1)
    return lora


def test_kd_absorbs_a_spanned_direction_into_the_earlier_magnitudes_by_hand():
    lora = _absorbable_lora()
    factors = [(lora.down[t][0, 0].clone(), lora.up[t][0, 0].clone()) for t in range(3)]
    scale = [float(torch.norm(b) * torch.norm(a)) for a, b in factors]
    fits = {(layer, which): residual for layer, which, residual, _ in lora.absorb_last(threshold=9e-4)}
    assert fits[(0, 0)] < 1e-6 and all(r > 0.1 for key, r in fits.items() if key != (0, 0))
    # D2 = B2 A2 / s2 = (0.5 s0 D0 - 0.3 s1 D1) / s2: Eq. 7's coefficients are 0.5 s0 / s2 and -0.3 s1 / s2
    offsets = lora.magnitude_offsets
    assert torch.allclose(offsets[:2, 0, 0], torch.tensor([0.5 * scale[0] / scale[2], -0.3 * scale[1] / scale[2]]))
    assert offsets.abs().sum() == offsets[:2, 0, 0].abs().sum()  # nothing else moved
    assert not lora.down[2][0, 0].any() and not lora.up[2][0, 0].any()  # the new direction is gone
    assert lora.up[2][0, 1].any()  # the value slice's was not spanned: kept
    lora.add_task(rank=2)  # the absorbed task becomes an earlier one; the new one starts at B = 0
    x = torch.randn(3, TINY_VIT["embed_dim"])
    with torch.no_grad():
        for magnitude, value in zip(lora.magnitudes, (1.7, 0.4, 2.5, 0.8)):
            magnitude.fill_(value)
        directions = [x @ a.T @ b.T / s for (a, b), s in zip(factors, scale)]
        # Eq. 8: (m0 + c0) D0 + (m1 + c1) D1 stands for m0 D0 + m1 D1 + D2; task 2's own magnitude has no direction
        expected = 1.7 * directions[0] + 0.4 * directions[1] + directions[2]
        assert torch.allclose(lora.update(0, 0, x), expected, atol=1e-5)


def test_the_gram_from_factors_equals_dense_least_squares():
    lora = _absorbable_lora()
    dense = torch.stack([(lora.up[t][1, 1] @ lora.down[t][1, 1]).double().flatten()
                         / float(torch.norm(lora.up[t][1, 1]) * torch.norm(lora.down[t][1, 1]))
                         for t in range(3)], dim=1)
    assert torch.allclose(lora.direction_gram(1, 1), dense.T @ dense, atol=1e-10)
    solution = torch.linalg.lstsq(dense[:, :2], dense[:, 2:], driver="gelsd").solution.squeeze(1)
    residual = float(torch.norm(dense[:, 2] - dense[:, :2] @ solution))
    fits = {(layer, which): (r, norm) for layer, which, r, norm in lora.absorb_last(threshold=0.0)}
    assert fits[(1, 1)] == pytest.approx((residual, float(torch.norm(dense[:, 2]))), rel=1e-6)


def test_kd_in_a_run_absorbs_every_direction_under_a_loose_threshold_and_resumes(tiny_npz, tmp_path):
    """A residual is at most ||D_t||_F <= 1, so a threshold of 2 absorbs every new direction from the second task
    on: the summary counts them, the absorbed tasks' factors are zero, and a resumed run ends with the same state."""
    reference, expected, resumed, results = run_interrupted_and_resumed(
        lambda folder: _trainer(tiny_npz, folder, kd_threshold=2.0), tmp_path, after_task=1)
    lora = reference.model.sd_lora
    assert [t["method"]["absorbed_directions"] for t in expected["tasks"]] == [0, 2 * lora.layers, 4 * lora.layers]
    assert lora.magnitude_offsets[:2].abs().sum() > 0 and not lora.up[1].any() and not lora.up[2].any()
    assert results["correct"] == expected["correct"]
    for key, value in lora.state_dict().items():
        assert torch.equal(resumed.model.sd_lora.state_dict()[key], value), key


def test_a_checkpoint_from_before_kd_loads_with_zero_offsets():
    _, lora = _vit_with_two_tasks()
    older = {k: v for k, v in lora.state_dict().items() if k != "magnitude_offsets"}
    _, fresh = _vit_with_two_tasks()
    fresh.magnitude_offsets.fill_(1.0)
    fresh.load_state_dict(older)
    assert not fresh.magnitude_offsets.any() and fresh.magnitude_offsets.shape == (2, TINY_VIT["depth"], 2)
