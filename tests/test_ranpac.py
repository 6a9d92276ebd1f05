"""RanPAC (slca_kit/methods/ranpac.py): the ridge solution and its ridge choice against the official formulas, the
AdaptFormer adapter hooks against the official block's arithmetic, and the method in the trainer (first-session
training, frozen afterwards, G and Q against features computed independently, resume, two processes)."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from slca_kit.methods.ranpac import choose_ridge, ridge_readout
from slca_kit.models.heads import CosineHead
from slca_kit.models.parallel_adapter import ParallelAdapters

from conftest import cloned_state, hooked_vit_trainer, record_after_each_task, run_interrupted_and_resumed

RIDGES = [10.0 ** k for k in range(-8, 9)]


def test_ridge_readout_by_hand_and_against_solve():
    # one feature, one class: W = q / (g + ridge) = 2 / (4 + 1)
    assert ridge_readout(torch.tensor([[4.0]]), torch.tensor([[2.0]]), 1.0).item() == pytest.approx(0.4)
    torch.manual_seed(0)
    hidden, targets = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    gram, sums = hidden.T @ hidden, hidden.T @ targets
    expected = torch.linalg.inv(gram + 0.5 * torch.eye(4, dtype=torch.float64)) @ sums
    assert torch.allclose(ridge_readout(gram, sums, 0.5), expected.T)


def _official_ridge(features, onehot_all_classes, ridges):
    """RanPAC.py:138-150 as written: MSE over every class column (zeros for classes not in the task)."""
    cut = int(features.shape[0] * 0.8)
    q_val, g_val = features[:cut].T @ onehot_all_classes[:cut], features[:cut].T @ features[:cut]
    losses = []
    for ridge in ridges:
        wo = torch.linalg.solve(g_val + ridge * torch.eye(g_val.shape[0]), q_val).T
        losses.append(F.mse_loss(features[cut:] @ wo.T, onehot_all_classes[cut:]))
    return ridges[int(torch.stack(losses).argmin())]


@pytest.mark.parametrize("noise", [0.0, 0.3, 3.0])
def test_ridge_choice_matches_the_official_scoring_over_all_classes(noise):
    torch.manual_seed(1)
    hidden = torch.relu(torch.randn(60, 12))
    labels = (hidden[:, :3] + noise * torch.randn(60, 3)).argmax(1)  # three classes of this task
    targets = F.one_hot(labels, 3).float()
    everything = torch.cat([torch.zeros(60, 4), targets, torch.zeros(60, 5)], dim=1)  # 4 old, 5 later classes
    order = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    chosen = choose_ridge(hidden, targets, RIDGES, 0.8, order)
    assert chosen == _official_ridge(hidden[order], everything[order], RIDGES)


def test_parallel_adapter_hooks_compute_the_official_block():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=32, depth=2,
                            num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = vit(x)
    adapters = ParallelAdapters(vit.blocks, 32, bottleneck=4, scale=0.1, dropout=0.1).eval()  # a model's submodule
    with torch.no_grad():
        assert torch.equal(vit(x), plain)  # "lora" init: up = 0, the ViT computes as before
        for adapter in adapters.adapters:
            adapter.up.weight.normal_()
            adapter.up.bias.normal_()
        adapted = vit(x)
        vit.train(), adapters.train()
        torch.manual_seed(1)
        adapted_training = vit(x)  # the adapters' dropout is the only random step
        vit.eval(), adapters.eval()
        with adapters.disabled():
            assert torch.equal(vit(x), plain)

        # the official Block.forward (RanPAC petl/vision_transformer_adapter.py:165-180) with its Adapter.forward
        # (:70-90, dropout 0.1 on the ReLU's output while training, :159), written out
        def official(training):
            tokens = vit._pos_embed(vit.patch_embed(x))
            for block, adapter in zip(vit.blocks, adapters.adapters):
                tokens = tokens + block.attn(block.norm1(tokens))
                down = F.dropout(torch.relu(adapter.down(tokens)), p=0.1, training=training)
                tokens = tokens + (block.mlp(block.norm2(tokens)) + adapter.up(down) * 0.1)
            return vit.norm(tokens)[:, 0]

        with adapters.disabled():
            expected = official(training=False)
            torch.manual_seed(1)
            expected_training = official(training=True)
        assert torch.allclose(adapted, expected, atol=1e-5) and not torch.allclose(adapted, plain, atol=1e-3)
        assert torch.allclose(adapted_training, expected_training, atol=1e-5)
        assert not torch.allclose(adapted_training, adapted, atol=1e-3)
        adapters.remove()
        assert torch.equal(vit(x), plain)


def test_cosine_head_is_sigma_times_cosine():
    head = CosineHead(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 0.0], [1.0, 1.0]]))
        head.sigma.fill_(2.0)
    logits = head(torch.tensor([[0.0, 5.0]]))
    assert torch.allclose(logits, torch.tensor([[0.0, 2.0 / math.sqrt(2)]]))


def _trainer(tiny_npz, tmp_path, **params):
    return hooked_vit_trainer(tiny_npz, tmp_path, "ranpac", **{"projection_dim": 50, "adapter_bottleneck": 8, **params})


def test_first_session_trains_adapters_then_everything_stays_frozen(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path)
    initial_backbone = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    adapters_after = record_after_each_task(trainer, lambda model: cloned_state(model.first_session_tuner))
    results = trainer.run()
    model, method = trainer.model, trainer.method
    assert [trainer.method.train_epochs(trainer.context(t)) for t in range(3)] == [2, 0, 0]
    assert any(v.abs().sum() > 0 for k, v in adapters_after[0].items() if k.endswith("up.weight"))  # trained
    assert all(torch.equal(adapters_after[0][k], adapters_after[2][k]) for k in adapters_after[0])  # then frozen
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, initial_backbone[name]), name  # the ViT itself never moves
    # G and Q against the final model's features of every seen training image, projected independently
    classes = list(range(6))
    features, labels = trainer.extract_features(classes, "train")
    generator = torch.Generator().manual_seed(trainer.config.train.seed)
    projection = torch.randn(features.shape[1], 50, generator=generator)
    hidden = torch.relu(features.float() @ projection)
    assert torch.allclose(method.gram, hidden.T @ hidden, rtol=1e-4, atol=1e-3)
    assert torch.allclose(method.class_sums, hidden.T @ F.one_hot(labels, 6).float(), rtol=1e-4, atol=1e-4)
    assert torch.allclose(method.readout, ridge_readout(method.gram, method.class_sums, method.chosen_ridges[-1]))
    assert len(method.chosen_ridges) == 3 and all(r in RIDGES for r in method.chosen_ridges)
    assert [record["method"]["ridge"] for record in results["tasks"]] == method.chosen_ridges
    # predictions are the ridge readout of the projected features
    test_features, test_labels = trainer.extract_features(classes, "test")
    predicted = (torch.relu(test_features.float() @ projection) @ method.readout.T).argmax(1)
    assert int((predicted == test_labels).sum()) == sum(results["correct"][-1])


def test_without_first_session_nothing_trains_and_no_projection_is_plain_ridge(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, first_session="none", projection_dim=0)
    results = trainer.run()
    assert not hasattr(trainer.model, "first_session_tuner")
    features, labels = trainer.extract_features(list(range(6)), "train")
    assert torch.allclose(trainer.method.gram, features.T @ features, rtol=1e-4, atol=1e-3)
    assert trainer.method.readout.shape == (6, features.shape[1]) and results["complete"]


def test_resume_after_a_task_matches_uninterrupted(tiny_npz, tmp_path):
    reference, expected, resumed, results = run_interrupted_and_resumed(
        lambda folder: _trainer(tiny_npz, folder), tmp_path, after_task=0)
    assert results["correct"] == expected["correct"]
    assert torch.equal(resumed.method.gram, reference.method.gram)
    assert torch.equal(resumed.method.readout, reference.method.readout)
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
