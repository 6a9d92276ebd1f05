"""InfLoRA: branches on K and V only, A orthogonal to the DualGPM subspace, DualGPM thresholds and dual form."""
import pytest
import torch
from torch import nn

from slca_kit.resolve import config_from_dict
from slca_kit.methods.inflora import DualGPM, InfLoRAQKV, design_down_projection
from slca_kit.trainer import Trainer

from conftest import Interrupted, interrupt_after, tiny_recipe


def _covariance(dim, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, rank or dim, generator=g, dtype=torch.float64)
    if rank:
        x = x @ torch.randn(rank, dim, generator=g, dtype=torch.float64)
    return x.T @ x


def test_branch_changes_only_k_and_v_and_is_zero_at_start():
    base = nn.Linear(6, 18)
    layer = InfLoRAQKV(base)
    layer.add_task(2)
    x = torch.randn(3, 5, 6)
    assert torch.equal(layer(x), base(x))  # B = 0
    with torch.no_grad():
        layer.down[0].normal_()
        layer.up[0].normal_()
    out = layer(x)
    assert torch.equal(out[..., :6], base(x)[..., :6])  # q untouched
    k_expected = base(x)[..., 6:12] + x @ layer.down[0][0].T @ layer.up[0][0].T
    assert torch.allclose(out[..., 6:12], k_expected, atol=1e-5)


def test_threshold_counts_squared_singular_values_as_the_official_code():
    """Energy = squared singular values of the input covariance (InfLoRA methods/inflora.py:330-332, 349-356)."""
    memory = DualGPM(4)
    covariance = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))  # energies 16, 9, 4, 1 of 30
    # first task: r = #{k: cumsum(ratio)_k < 0.7} = #{0.533} = 1 (the plain eigenvalues would give 0.4, 0.7: 2)
    assert memory.update(covariance, 0.7) == 1
    assert torch.allclose((memory.basis @ memory.basis.T).diagonal(), torch.tensor([1.0, 0, 0, 0],
                                                                                   dtype=torch.float64), atol=1e-9)
    # later task, same inputs: 16/30 captured; add 9/30 (0.833 < 0.95), then 4/30 (0.967): two more
    assert memory.update(covariance, 0.95) == 2


def test_one_over_i_spectrum_keeps_eleven_directions_at_095():
    """The issue's example: eigenvalues proportional to 1/i in 768 dimensions, threshold 0.95."""
    memory = DualGPM(768)
    values = 1.0 / torch.arange(1, 769, dtype=torch.float64)
    assert memory.update(torch.diag(values), 0.95) == 11


def test_designed_a_is_orthogonal_to_the_stored_subspace():
    memory = DualGPM(16)
    memory.update(_covariance(16, 0, rank=5), 0.99)
    stored = memory.basis
    assert stored.shape[1] >= 1
    down = design_down_projection(_covariance(16, 1), memory, rank=4).double()
    assert torch.allclose(down @ stored, torch.zeros(4, stored.shape[1], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(down @ down.T, torch.eye(4, dtype=torch.float64) / 3, atol=1e-6)  # / sqrt(3)


def test_dual_form_tracks_the_union_of_task_subspaces():
    """Three tasks whose inputs span 2 directions each in 8-d. The official first-task rule keeps one direction
    fewer than the threshold needs (cumsum < threshold), so the first task's inputs come twice; after the third
    task the subspace is 6-d, stored as its 2-d complement ("retain"), with the projector onto the union."""
    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(2, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    inputs = [torch.randn(100, 2, generator=g, dtype=torch.float64) @ factor for factor in factors]
    memory = DualGPM(8)
    assert memory.update(inputs[0].T @ inputs[0], 1 - 1e-9) == 1
    assert memory.update(inputs[0].T @ inputs[0], 1 - 1e-9) == 1
    for x in inputs[1:]:
        assert memory.update(x.T @ x, 1 - 1e-9) == 2
    union = torch.linalg.qr(torch.cat(factors).T).Q
    assert memory.mode == "retain" and memory.basis.shape == (8, 2)
    assert torch.allclose(memory.projector(), union @ union.T, atol=1e-8)


def test_end_to_end_trains_only_branches_and_heads(tiny_npz, tmp_path):
    recipe = tiny_recipe(tiny_npz, tmp_path, method="inflora", train={"epochs": 2, "optimizer": "adam", "lr": 5e-4,
                                                                      "scheduler": "coda_cosine"})
    recipe["method"]["params"] = {"rank": 4}
    trainer = Trainer(config_from_dict(recipe))
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    results = trainer.run()
    assert results["complete"] and len(results["accuracy_matrix"]) == 3
    after = trainer.model.backbone.state_dict()
    for key, value in after.items():
        if ".qkv.up." in key or ".qkv.down." in key:
            continue
        assert torch.equal(value, before[key.replace("attn.qkv.base.", "attn.qkv.")]), key  # backbone frozen
    layer = trainer.model.backbone.blocks[0].attn.qkv
    assert len(layer.down) == 3 and all(layer.up[t].abs().sum() > 0 for t in range(3))
    assert all(memory.basis.shape[1] > 0 for memory in trainer.method.memories)


def test_resume_rebuilds_the_branches(tiny_npz, tmp_path):
    recipe = tiny_recipe(tiny_npz, tmp_path, method="inflora", train={"epochs": 1})
    recipe["method"]["params"] = {"rank": 4}
    reference = Trainer(config_from_dict(tiny_recipe(tiny_npz, tmp_path / "ref", method="inflora",
                                                     train={"epochs": 1}) | {"method": recipe["method"]})).run()
    trainer = Trainer(config_from_dict(recipe))
    interrupt_after(trainer, 0)
    with pytest.raises(Interrupted):
        trainer.run()
    resumed = Trainer(config_from_dict(recipe)).run(resume=True)
    assert resumed["correct"] == reference["correct"]
