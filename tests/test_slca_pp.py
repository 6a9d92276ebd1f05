"""SLCA++ pieces against hand-worked numbers (slca.md, "SLCA++ differences")."""
import math

import pytest
import torch

from slca_kit.alignment import AlignmentSettings, age_divisors
from slca_kit.resolve import config_from_dict
from slca_kit.errors import ConfigError
from slca_kit.methods.slca_pp import reverse_cross_entropy, svd_init_lora
from slca_kit.trainer import Trainer

from conftest import tiny_recipe

ADAPTER = {"type": "lora", "r": 4, "lora_alpha": 3.2, "target_modules": r"blocks\.\d+\.(attn\.qkv|mlp\.fc[12])",
           "train_backbone": ["norm", "bias", "cls_token"]}


def _trainer(tiny_npz, tmp_path, **train):
    recipe = tiny_recipe(tiny_npz, tmp_path, method="slca_pp", train={"epochs": 1, "lr": 0.01, **train})
    recipe["adapter"] = dict(ADAPTER)
    return Trainer(config_from_dict(recipe))


def test_reverse_cross_entropy_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    assert reverse_cross_entropy(logits, torch.tensor([1])).item() == pytest.approx(-math.log(1e-4) * 0.25)
    assert reverse_cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(-math.log(1e-4) * 0.75)


def test_reverse_cross_entropy_clamps_probabilities_at_1e7():
    """slca_pp.py:125: a probability below 1e-7 counts as 1e-7 (the unclamped value would be ~9e-14 * 9.2)."""
    logits = torch.tensor([[0.0, 30.0]], requires_grad=True)  # p_0 = e^-30 ~ 9.4e-14
    loss = reverse_cross_entropy(logits, torch.tensor([1]))
    assert loss.item() == pytest.approx(-math.log(1e-4) * 1e-7, rel=1e-4)
    loss.backward()
    assert logits.grad.abs().max() == 0  # clamped: no gradient through p_0, and p_1's term is log(1) = 0


def test_svd_init_spans_the_top_singular_directions(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path)
    assert trainer.model.backbone.blocks[0].attn.qkv.scaling["default"] == pytest.approx(0.8)
    assert svd_init_lora(trainer.model.backbone) == 2 * 3  # qkv, fc1, fc2 in 2 blocks
    layer = trainer.model.backbone.blocks[1].mlp.fc1
    a = layer.lora_A["default"].weight
    w = layer.get_base_layer().weight
    assert torch.allclose(a @ a.T, torch.eye(4), atol=1e-5)  # orthonormal rows
    singular = torch.linalg.svdvals(w)
    assert torch.allclose((w @ a.T).norm(dim=0), singular[:4], atol=1e-4)  # W A^T keeps the top-4 energies
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_learning_rates_per_task(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path)
    for task, lora_lr in ((0, 0.005), (1, 0.001)):
        trainer._add_heads_until(task)
        ctx = trainer.context(task)
        trainer.method.before_task(trainer.model, ctx)
        groups = {g["name"]: g for g in trainer.method.param_groups(trainer.model, ctx)}
        assert groups["adapter"]["lr"] == pytest.approx(lora_lr)
        assert groups["backbone"]["lr"] == pytest.approx(1e-3) and groups["head"]["lr"] == pytest.approx(0.01)
    names = {n for n, p in trainer.model.backbone.named_parameters() if p.requires_grad}
    assert "cls_token" in names and "blocks.0.norm1.weight" in names and "blocks.0.attn.qkv.base_layer.bias" in names
    assert "blocks.0.attn.qkv.base_layer.weight" not in names and "blocks.0.attn.proj.weight" not in names


def test_alignment_age_scaling():
    settings = AlignmentSettings(epochs=1, lr=0.1, momentum=0, weight_decay=0, samples_per_class=1, batch_size=1,
                                 tau=None, mean_shrink=False, age_scale=0.02, age_scale_jitter=0.0)
    task_ids = torch.tensor([0, 1, 3])
    divisors = age_divisors(task_ids, 3, settings, torch.Generator().manual_seed(0))
    assert torch.allclose(divisors, torch.tensor([1.06, 1.04, 1.0]))
    settings.age_scale_jitter = 0.01
    jittered = age_divisors(torch.zeros(1000, dtype=torch.long), 3, settings, torch.Generator().manual_seed(0))
    assert jittered.min() >= 1 + 3 * 0.01 - 1e-6 and jittered.max() <= 1 + 3 * 0.03 + 1e-6


def test_end_to_end_and_evaluation_head_scales(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path)
    results = trainer.run()
    assert results["complete"] and trainer.method.params.mean_shrink is False
    x = torch.randn(4, 3, 32, 32)
    ctx = trainer.context(2)
    with torch.no_grad():
        features = trainer.model.eval().features(x)
        heads = trainer.method.aligned_head.heads
        expected = torch.cat([heads[t](features * (1 + 0.02 * (2 - t))) for t in range(3)], dim=1)
        assert torch.allclose(trainer.method.predict(trainer.model, x, ctx), expected, atol=1e-6)


def test_needs_a_lora_adapter(tiny_npz, tmp_path):
    recipe = tiny_recipe(tiny_npz, tmp_path, method="slca_pp")
    with pytest.raises(ConfigError, match="adapter.type: method slca_pp needs a LoRA adapter"):
        Trainer(config_from_dict(recipe))
