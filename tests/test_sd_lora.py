"""SD-LoRA (slca_kit/methods/sd_lora.py, models/decoupled_lora.py): the qkv hook computes WuYichen-97/SD-Lora-CL
backbone/lora.py ``_LoRA_qkv_timm_train.forward`` written out, the magnitude / direction split equals the plain LoRA
delta, a run freezes earlier directions and retrains every magnitude, SD-LoRA-RR's ranks, resume and bad input."""
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
                                         ({"rank_reduction": [[4]]}, "rank_reduction")])
def test_bad_settings_are_refused(tiny_npz, tmp_path, params, key):
    with pytest.raises(ConfigError, match=key):
        _trainer(tiny_npz, tmp_path, **params)
