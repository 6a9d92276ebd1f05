"""The classic lifelong-learning family: each method's core mechanism against a hand-worked case, and what the
trainer reports for them (task-incremental accuracy, per-task method numbers, resume)."""
import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from slca_kit.config import Config
from slca_kit.resolve import config_from_dict
from slca_kit.data.scenario import Scenario
from slca_kit.methods.den import DEN, DENNetwork, group_soft_threshold_, soft_threshold_
from slca_kit.methods.generative_replay import ConditionalVAE, GaussianGenerator, GenerativeFeatureReplay
from slca_kit.methods.lwf import LwF, soft_target_cross_entropy
from slca_kit.methods.packnet import PackNet
from slca_kit.methods.regularization import EWC, MAS, SI
from slca_kit.methods.replay import Replay, herding_order
from slca_kit.models.heads import IncrementalHead
from slca_kit.report import comparison_table
from slca_kit.trainer import Trainer

from conftest import Interrupted, interrupt_after, interrupt_before_epoch, tiny_recipe


def fake_ctx(task, task_sizes, batches=(), gathered=None):
    scenario = Scenario(class_order=tuple(range(sum(task_sizes))), task_sizes=tuple(task_sizes))
    return SimpleNamespace(
        task=task, scenario=scenario, known_classes=scenario.task_offset(task),
        seen_classes=scenario.seen_classes(task), device=torch.device("cpu"),
        iterate_images=lambda classes, split, batch_size: iter(batches), reduce_sum=lambda t: t,
        gather_features=lambda classes, split: gathered, timer=lambda name: contextlib.nullcontext(),
        accelerator=SimpleNamespace(unwrap_model=lambda m: m))


class TinyModel(nn.Module):
    """logits = H (V x) + b: a backbone V (2x3, no bias) and one 2-class head per task."""

    def __init__(self, tasks=1):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(3, 2, bias=False)
        self.head = IncrementalHead(2)
        for _ in range(tasks):
            self.head.add_task(2)

    def forward(self, x):
        return self.head(self.backbone(x))


def build(cls, **params):
    return cls(cls.Params(**params), Config())


# -- EWC / MAS / SI ---------------------------------------------------------------------------------
def test_ewc_fisher_is_the_mean_squared_per_sample_gradient():
    model = TinyModel()
    x = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    method = build(EWC, importance_batch_size=2, fisher_max=None)  # two batches: 2 + 1 samples
    fisher = method.task_importance(model, fake_ctx(0, [2], batches=[(x[:2], y[:2]), (x[2:], y[2:])]))
    # By hand: dCE/dlogits = softmax - onehot; dlogits/dV = H^T (.) x^T.
    H = model.head.heads[0].weight.detach()
    expected = torch.zeros(2, 3)
    for i in range(3):
        p = torch.softmax(model(x[i:i + 1]).detach()[0], 0)
        g = p - torch.nn.functional.one_hot(y[i], 2).float()
        expected += torch.outer(H.T @ g, x[i]) ** 2 / 3
    assert torch.allclose(fisher["backbone.weight"], expected, atol=1e-6)
    clamped = build(EWC, importance_batch_size=2, fisher_max=0.01).task_importance(
        model, fake_ctx(0, [2], batches=[(x[:2], y[:2]), (x[2:], y[2:])]))
    assert torch.allclose(clamped["backbone.weight"], expected.clamp_max(0.01), atol=1e-6)


def test_mas_importance_is_the_mean_absolute_gradient_of_the_squared_output_norm():
    model = TinyModel()
    x = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]])
    omega = build(MAS).task_importance(model, fake_ctx(0, [2], batches=[(x, torch.tensor([0, 1]))]))
    H, b = model.head.heads[0].weight.detach(), model.head.heads[0].bias.detach()
    V = model.backbone.weight.detach()
    expected = sum(torch.outer(H.T @ (2 * (H @ V @ xi + b)), xi).abs() for xi in x) / 2  # d||f||^2 = 2 H^T f x^T
    assert torch.allclose(omega["backbone.weight"], expected, atol=1e-6)


def test_ewc_merged_penalty_has_the_gradient_of_one_penalty_per_task():
    method = build(EWC)
    f1, t1 = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 1.0, -1.0])
    f2, t2 = torch.tensor([3.0, 0.0, 0.5]), torch.tensor([1.5, -2.0, 0.0])
    method.consolidate({"w": f1}, {"w": t1})
    method.consolidate({"w": f2}, {"w": t2})
    theta = torch.tensor([0.2, 0.3, 0.4])
    merged = method.importance["w"] * (theta - method.anchor["w"])  # half the gradient of A (theta - m)^2
    separate = f1 * (theta - t1) + f2 * (theta - t2)
    assert torch.allclose(merged, separate)
    assert torch.equal(method.importance["w"], f1 + f2)
    assert method.anchor["w"][1] == t2[1]  # no Fisher at all: the latest parameters


def test_online_ewc_decays_the_fisher_and_keeps_one_anchor():
    method = build(EWC, online=True, gamma=0.5)
    method.consolidate({"w": torch.tensor([4.0])}, {"w": torch.tensor([1.0])})
    method.consolidate({"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])})
    assert method.importance["w"].item() == 0.5 * 4.0 + 1.0 and method.anchor["w"].item() == 3.0


def test_penalty_enters_the_training_loss_with_the_papers_factor():
    model = TinyModel(tasks=2)
    method = build(EWC, ewc_lambda=10.0)
    ctx = fake_ctx(1, [2, 2])
    method.importance = {"backbone.weight": torch.full((2, 3), 2.0)}
    method.anchor = {"backbone.weight": torch.zeros(2, 3)}
    method.before_epoch(model, ctx, 0)
    x, y = torch.randn(4, 3), torch.tensor([2, 3, 2, 3])
    plain = torch.nn.functional.cross_entropy(model(x)[:, 2:], y - 2)
    expected = plain + 0.5 * 10.0 * (2.0 * model.backbone.weight.detach() ** 2).sum()
    assert torch.allclose(method.training_loss(model, x, y, ctx), expected)


def test_si_path_integral_by_hand():
    model = TinyModel()
    method = build(SI, xi=0.5)
    ctx = fake_ctx(0, [2])
    method.before_task(model, ctx)
    method.before_epoch(model, ctx, 0)
    start = model.backbone.weight.detach().clone()
    lr, grads = 0.1, [torch.full((2, 3), 1.0), torch.tensor([[2.0, 0, -1], [0, 1, 3]])]
    for g in grads:  # plain SGD steps with known gradients
        model.backbone.weight.grad = g.clone()
        with torch.no_grad():
            model.backbone.weight -= lr * g
        method.after_optimizer_step(model, ctx)
    omega = lr * (grads[0] ** 2 + grads[1] ** 2)  # -g . delta = lr g^2 per step
    change = -lr * (grads[0] + grads[1])
    importance = method.task_importance(model, ctx)["backbone.weight"]
    assert torch.allclose(importance, omega / (change ** 2 + 0.5))
    assert torch.allclose(model.backbone.weight.detach(), start + change)


# -- LwF ----------------------------------------------------------------------------------------------
def test_soft_target_cross_entropy_by_hand():
    logits, teacher = torch.tensor([[2 * math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]])
    # T = 2: student probabilities (3/4, 1/4), teacher (1/2, 1/2)
    expected = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    assert soft_target_cross_entropy(logits, teacher, 2.0).item() == pytest.approx(expected)


def test_lwf_distils_from_a_frozen_snapshot():
    model = TinyModel(tasks=2)
    method = build(LwF, temperature=2.0, distill_lambda=3.0)
    ctx = fake_ctx(1, [2, 2])
    method.before_task(model, ctx)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(not p.requires_grad for p in method.old_model.parameters())
    with torch.no_grad():
        model.backbone.weight.add_(1.0)  # the model moves on; the snapshot must not
    for name, value in method.old_model.state_dict().items():
        assert torch.equal(value, before[name])
    x, y = torch.randn(5, 3), torch.tensor([2, 3, 2, 2, 3])
    logits = model(x)
    expected = torch.nn.functional.cross_entropy(logits[:, 2:], y - 2) + 3.0 * soft_target_cross_entropy(
        logits[:, :2], method.old_model(x)[:, :2], 2.0)
    assert torch.allclose(method.training_loss(model, x, y, ctx), expected)


# -- replay -------------------------------------------------------------------------------------------
def test_herding_picks_by_hand():
    # Normalised: a (1, 0), b (0, 1), c (.707, .707), d (.981, .196); mean (.672, .476).
    # k=1: |mu - x|^2 = a .334, b .726, c .055, d .174 -> c.  k=2: (c + x)/2: a .048, b .244, d .030 -> d.
    # k=3: (c + d + x)/3: a .081, b .037 -> b (not a, although a alone is closer to the mean).  Then a.
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [1.0, 0.2]])
    assert herding_order(features, 4) == [2, 3, 1, 0]
    assert herding_order(features, 2) == [2, 3]


def test_replay_budget_and_shrinking():
    method = build(Replay, memory_size=4)
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [1.0, 0.2]] * 2)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    indices = torch.arange(10, 18)
    method.after_training(None, fake_ctx(0, [2, 2], gathered=(features, labels, indices)))
    assert method.exemplars == {0: [12, 13], 1: [16, 17]}  # herding picks c, d of each class (2 per class)
    assert method.extra_training_samples(fake_ctx(1, [2, 2])) == [12, 13, 16, 17]
    method.after_training(None, fake_ctx(1, [2, 2], gathered=(features, labels + 2, indices + 100)))
    assert method.exemplars == {0: [12], 1: [16], 2: [112], 3: [116]}  # 4 // 4 = 1 each: old ones shrink


def test_replay_rejects_two_budgets():
    from slca_kit.errors import ConfigError

    with pytest.raises(ConfigError, match="exactly one of memory_size"):
        Replay.Params(memory_size=10, memory_per_class=2)


# -- generative replay ---------------------------------------------------------------------------------
def test_gaussian_generator_samples_its_class_moments():
    means = torch.tensor([[1.0, -2.0], [5.0, 0.0]])
    covariance = torch.tensor([[4.0, 1.2], [1.2, 1.0]])
    generator = GaussianGenerator(means, torch.linalg.cholesky(covariance).expand(2, 2, 2))
    torch.manual_seed(0)
    samples = generator.sample(torch.ones(40000, dtype=torch.long))  # class 1 only
    assert torch.allclose(samples.mean(0), means[1], atol=0.05)
    assert torch.allclose(torch.cov(samples.T), covariance, atol=0.08)


def test_generative_replay_mixes_generated_old_classes_into_the_batch():
    method = build(GenerativeFeatureReplay, replay_ratio=0.5)
    # task 0 (classes 0, 1) and task 1 (classes 2, 3) have generators; task 2 is training
    no_spread = torch.zeros(2, 2, 2)
    method.generators.append(GaussianGenerator(torch.tensor([[10.0, 0], [0, 10.0]]), no_spread))
    method.generators.append(GaussianGenerator(torch.tensor([[-10.0, 0], [0, -10.0]]), no_spread))
    ctx = fake_ctx(2, [2, 2, 2])
    torch.manual_seed(0)
    features, labels = method.sample_replay(500, ctx)
    assert set(labels.tolist()) == {0, 1, 2, 3}  # every earlier class, never a current one
    expected = torch.tensor([[10.0, 0], [0, 10.0], [-10.0, 0], [0, -10.0]])[labels]  # zero covariance: the means
    assert torch.equal(features, expected)
    model = nn.Module()
    model.head = IncrementalHead(2)
    for _ in range(3):
        model.head.add_task(2)
    model.forward = lambda images, extra_features=None: model.head(torch.cat([images, extra_features]))
    images, current = torch.randn(4, 2), torch.tensor([4, 5, 4, 5])
    torch.manual_seed(1)
    loss = method.training_loss(model, images, current, ctx)
    torch.manual_seed(1)
    replayed, replayed_labels = method.sample_replay(2, ctx)  # 0.5 x 4 images
    logits = model.head(torch.cat([images, replayed]))
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, torch.cat([current, replayed_labels])))


def test_conditional_vae_learns_class_conditional_features():
    torch.manual_seed(0)
    classes = torch.arange(2).repeat(200)
    features = torch.tensor([[3.0, 0.0, 1.0], [-3.0, 2.0, 0.0]])[classes] + 0.1 * torch.randn(400, 3)
    cvae = ConditionalVAE(3, 2, hidden=32, latent=2)
    optimizer = torch.optim.Adam(cvae.parameters(), lr=1e-2)
    for _ in range(300):
        loss = cvae.loss(features, classes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    samples = cvae.sample(torch.tensor([0] * 500 + [1] * 500))
    assert torch.allclose(samples[:500].mean(0), torch.tensor([3.0, 0.0, 1.0]), atol=0.3)
    assert torch.allclose(samples[500:].mean(0), torch.tensor([-3.0, 2.0, 0.0]), atol=0.3)


# -- PackNet ------------------------------------------------------------------------------------------
def _trainer(tiny_npz, tmp_path, method, params=None, **sections):
    recipe = tiny_recipe(tiny_npz, tmp_path, method=method, **sections)
    recipe["method"]["params"] = params or {}
    return Trainer(config_from_dict(recipe))


def _snapshot_after_each_task(trainer, select):
    snapshots = []
    original = trainer.method.end_task

    def end_task(model, ctx):
        original(model, ctx)
        snapshots.append({k: v.detach().clone() for k, v in select(model).items()})

    trainer.method.end_task = end_task
    return snapshots


def test_packnet_masks_are_disjoint_frozen_and_sized(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, "packnet", {"retrain_epochs": 1})
    snapshots = _snapshot_after_each_task(trainer, lambda m: dict(m.named_parameters()))
    results = trainer.run()
    owner = trainer.method.owner
    for name, tensor in owner.items():
        size = tensor.numel()
        first = int((tensor == 1).sum())
        assert first == round(0.25 * size)  # 1 - prune_fraction of every weight of the layer
        assert int((tensor == 2).sum()) == round(0.25 * (size - first))  # of what task 0 left free
        final = dict(trainer.model.named_parameters())[name].detach()
        for task in (0, 1):  # weights of earlier tasks never change afterwards
            mine = tensor == task + 1
            assert torch.equal(final[mine], snapshots[task][name][mine])
        assert torch.all(final[tensor == 0] == 0)  # released weights read as 0
    # Non-packed backbone parameters and task 0's head stay as they were.
    assert torch.equal(snapshots[0]["backbone.blocks.0.norm1.weight"], snapshots[2]["backbone.blocks.0.norm1.weight"])
    assert torch.equal(snapshots[0]["head.heads.0.weight"], snapshots[2]["head.heads.0.weight"])
    # Task-incremental: no forgetting at all, so every column of the matrix is constant.
    matrix = results["task_incremental"]["accuracy_matrix"]
    for j in range(3):
        assert len({matrix[i][j] for i in range(j, 3)}) == 1
    assert results["tasks"][2]["method"]["owned_fraction"] == pytest.approx([0.25, 0.1875, 0.140625], abs=1e-3)


def test_packnet_iterative_pruning_by_hand():
    model = nn.Module()
    model.layer = nn.Linear(4, 2)
    with torch.no_grad():
        model.layer.weight.copy_(torch.tensor([[0.1, -0.8, 0.3, 0.5], [-0.2, 0.7, -0.6, 0.4]]))
    method = build(PackNet, prune_fraction=0.75, prune_rounds=2, target_modules=r"layer\.weight")
    method.owner = {"layer.weight": torch.zeros(2, 4, dtype=torch.int16)}
    method.prune(model, task=0, round_index=1)  # keeps 0.25^(1/2) = half of 8: |w| 0.8, 0.7, 0.6, 0.5
    assert method.owner["layer.weight"].tolist() == [[0, 1, 0, 1], [0, 1, 1, 0]]
    assert model.layer.weight[0, 0] == 0 and model.layer.weight[1, 0] == 0
    method.prune(model, task=0, round_index=2)  # keeps 0.25 of 8: 0.8, 0.7; 0.6 and 0.5 are released
    assert method.owner["layer.weight"].tolist() == [[0, 1, 0, 0], [0, 1, 0, 0]]
    assert torch.allclose(model.layer.weight.detach(), torch.tensor([[0, -0.8, 0, 0], [0, 0.7, 0, 0]]))
    with torch.no_grad():  # task 1 trains the free weights; its pruning never touches task 0's
        model.layer.weight.copy_(torch.tensor([[0.9, -0.8, 0.3, 0.05], [-0.2, 0.7, -0.6, 0.4]]))
    method.prune(model, task=1, round_index=2)  # 0.25 of the 6 free weights: round(1.5) = 2 -> 0.9, 0.6
    assert method.owner["layer.weight"].tolist() == [[2, 1, 0, 0], [0, 1, 2, 0]]


def test_packnet_class_incremental_picks_the_most_confident_head():
    method = build(PackNet)
    ctx = fake_ctx(1, [2, 3])
    blocks = {0: torch.tensor([[4.0, 0.0], [0.0, 0.1]]), 1: torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 5.0]])}
    method.predict_task = lambda model, images, task, ctx: blocks[task]
    logits = method.predict(None, torch.zeros(2, 1), ctx)
    # sample 0: max softmax 0.982 (task 0) vs 0.665 (task 1) -> task 0; sample 1: 0.525 vs 0.987 -> task 1
    assert logits.argmax(1).tolist() == [0, 4]
    assert torch.isinf(logits[0, 2:]).all() and torch.isinf(logits[1, :2]).all()


# -- PNN ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,sizes", [
    # mlp column t: 64*8+8 + 8*8+8 + 8*2+2 = 610, plus per earlier column laterals 8*8 + 8*2 = 80
    ({"hidden": [8, 8]}, [610, 690, 770]),
    # adapter column t, 2 blocks of 64-d, rank 4: down 2*(64*4+4) + up 2*(4*64+64) + head 64*2+2 = 1290,
    # plus per earlier column one lateral 4*4 (block 1 only)
    ({"column": "adapter", "adapter_rank": 4}, [1290, 1306, 1322]),
], ids=["mlp", "adapter"])
def test_pnn_columns_are_frozen_and_growth_is_counted(tiny_npz, tmp_path, params, sizes):
    trainer = _trainer(tiny_npz, tmp_path, "pnn", params)
    snapshots = _snapshot_after_each_task(trainer, lambda m: dict(m.named_parameters()))
    results = trainer.run()
    column_zero = [n for n in snapshots[0] if n.startswith(("head.heads.0.", "columns.down.0.", "columns.up.0."))]
    assert column_zero
    for name in column_zero:
        assert torch.equal(snapshots[0][name], snapshots[2][name]), name
    for name, value in snapshots[0].items():
        if name.startswith("backbone."):
            assert torch.equal(value, snapshots[2][name]), name
    assert results["tasks"][2]["method"]["column_parameters"] == sizes
    matrix = results["task_incremental"]["accuracy_matrix"]
    assert len({matrix[i][0] for i in range(3)}) == 1  # task-incremental: column 0 is never touched


def test_a_new_adapter_column_starts_as_the_pretrained_vit(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, "pnn", {"column": "adapter", "adapter_rank": 4})
    model = trainer.model
    images = torch.randn(3, 3, 32, 32)
    plain = model.backbone(images)
    for task in range(2):
        model.head.add_task(2)
        trainer.method.grow(model, trainer.context(task))
    with torch.no_grad():  # column 0 trained: its pass changes, a fresh column 1 (up = 0) still equals the ViT
        for layer in model.columns.up[0]:
            layer.weight.normal_()
    features = model.features(images)
    assert features.shape == (3, 2, 64)
    assert not torch.allclose(features[:, 0], plain, atol=1e-4)
    assert torch.allclose(features[:, 1], plain, atol=1e-5)
    assert torch.allclose(model.backbone(images), plain)  # no column active outside a column pass


# -- DEN ----------------------------------------------------------------------------------------------
def test_proximal_steps_by_hand():
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    norms = group_soft_threshold_(rows, 1.0)  # norms 5 -> 4 (scaled by 0.8), 0.5 -> 0
    assert torch.allclose(rows, torch.tensor([[2.4, 3.2], [0.0, 0.0]])) and norms.tolist() == [4.0, 0.0]
    weights = torch.tensor([0.5, -0.05, -2.0])
    soft_threshold_(weights, 0.1)
    assert torch.allclose(weights, torch.tensor([0.4, 0.0, -1.9]))


def _hand_network():
    """2 inputs -> 3 units -> 2 units -> task heads; a few zero weights so the search has a shape."""
    network = DENNetwork(2, [3, 2])
    with torch.no_grad():
        network.weight_0.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        network.bias_0.zero_()
        network.weight_1.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
        network.bias_1.zero_()
    network.add_task(2)
    network.add_task(1)
    with torch.no_grad():
        network.heads[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        network.heads[1].weight.copy_(torch.tensor([[0.0, 3.0]]))  # task 1 reaches top unit 1 only
        for head in network.heads:
            head.bias.zero_()
    return network


def test_den_breadth_first_search_by_hand():
    selected = DEN.breadth_first_search(_hand_network(), 1)
    # head 1 -> top unit 1 -> its non-zero input: unit 2 of layer 0
    assert selected[1].tolist() == [False, True] and selected[0].tolist() == [False, False, True]


def test_den_split_keeps_both_tasks_networks():
    network = _hand_network()
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    old_task0 = network.task_logits(x, 0).detach()
    old_row, old_bias = network.weight_0[2].detach().clone(), network.bias_0[2].detach().clone()
    with torch.no_grad():
        network.weight_0[2] = torch.tensor([2.0, -1.0])  # task 1 retrained unit 2
    new_task1 = network.task_logits(x, 1).detach()
    network.split_unit(0, 2, old_row, old_bias, task=1)
    assert network.width(0) == 4 and network.retired_0.tolist()[2] == 1 and network.born_0.tolist()[3] == 1
    assert torch.allclose(network.task_logits(x, 0), old_task0)  # task 0 gets its unit back
    assert torch.allclose(network.task_logits(x, 1), new_task1)  # task 1 uses the copy


def test_den_expansion_adds_and_group_lasso_prunes():
    torch.manual_seed(0)
    features, targets = torch.randn(32, 2), torch.randint(0, 1, (32,))
    counts = {}
    for gl_lambda in (0.0, 1e6):  # no group penalty: all new units stay; a huge one: every new unit is zeroed
        network = _hand_network()
        method = build(DEN, epochs=2, expand_units=3, gl_lambda=gl_lambda, l1_lambda=0.0)
        record = {"added": [0, 0], "pruned": [0, 0]}
        method.expand(network, features, targets, 1, record)
        counts[gl_lambda] = (record["added"], record["pruned"], [network.width(0), network.width(1)])
    assert counts[0.0] == ([3, 3], [0, 0], [6, 5])
    assert counts[1e6] == ([3, 3], [3, 3], [3, 2])


def test_den_counts_follow_the_thresholds():
    torch.manual_seed(0)
    features = torch.randn(40, 2)
    targets = (features[:, 0] > 0).long()
    for split_threshold, loss_threshold in ((1e9, 1e9), (0.0, 0.0)):
        network = _hand_network()
        method = build(DEN, epochs=3, split_threshold=split_threshold, loss_threshold=loss_threshold,
                       expand_units=2)
        network.heads[1] = type(network.heads[0])(2, 2)
        record = method.learn_task(network, features, targets, 1)
        if split_threshold > 1:  # nothing drifts that far, and the loss never exceeds 1e9
            assert record["split"] == [0, 0] and not record["expanded"]
        else:  # units that moved at all split (only selected ones can); loss > 0: expansion
            assert all(s <= n for s, n in zip(record["split"], record["selected"])) and sum(record["split"]) > 0
            assert record["expanded"]
        assert record["units_total"][0] == 3 + record["added"][0] - record["pruned"][0] + record["split"][0]


def test_den_network_loads_a_grown_checkpoint():
    grown = _hand_network()
    grown.add_units(0, 2, task=1)
    fresh = DENNetwork(2, [3, 2])
    fresh.add_task(2)
    fresh.add_task(1)
    fresh.load_state_dict(grown.state_dict())
    x = torch.randn(3, 2)
    assert torch.equal(fresh(x), grown(x)) and fresh.width(0) == 5


# -- trainer integration ------------------------------------------------------------------------------
def test_report_labels_both_settings(tiny_npz, tmp_path):
    packnet = _trainer(tiny_npz, tmp_path, "packnet", {"retrain_epochs": 1}).run()
    seq = _trainer(tiny_npz, tmp_path, "seq_ft").run()
    assert seq["task_incremental"] is None and packnet["setting"] == "class-incremental"
    table = comparison_table([packnet, seq])
    assert "| tiny_packnet | packnet | class-incremental |" in table
    assert "| tiny_packnet | packnet | task-incremental |" in table
    assert "| tiny_seq_ft | seq_ft | task-incremental |" not in table
    assert (tmp_path / "tiny_packnet" / "accuracy_matrix_task_incremental.png").stat().st_size > 0


@pytest.mark.parametrize("method,params", [("ewc", {}), ("si", {}), ("lwf", {}), ("replay", {"memory_size": 6}),
                                           ("packnet", {"retrain_epochs": 1}),
                                           ("generative_replay", {"cvae_epochs": 2}),
                                           ("den", {"epochs": 2}), ("pnn", {"hidden": [8]}),
                                           ("pnn", {"column": "adapter", "adapter_rank": 4})])
def test_resume_mid_run_matches_uninterrupted(tiny_npz, tmp_path, method, params):
    """Interrupted inside task 1 (after an epoch checkpoint) -- or after task 0 for methods without epochs --
    then resumed: the same accuracies and the same final weights."""
    train = {"epochs": 2, "checkpoint_every_epoch": True, "keep_checkpoints": 10}
    reference_trainer = _trainer(tiny_npz, tmp_path / "ref", method, params, train=train)
    reference = reference_trainer.run()
    interrupted = _trainer(tiny_npz, tmp_path / "cut", method, params, train=train)
    if interrupted.method.train_epochs(interrupted.context(0)) == 0:
        interrupt_after(interrupted, 0)
    else:
        interrupt_before_epoch(interrupted, task=1, epoch=1)
    with pytest.raises(Interrupted):
        interrupted.run()
    resumed_trainer = _trainer(tiny_npz, tmp_path / "cut", method, params, train=train)
    resumed = resumed_trainer.run(resume=True)
    assert resumed["correct"] == reference["correct"]
    assert resumed["task_incremental"] == reference["task_incremental"]
    for name, value in reference_trainer.model.state_dict().items():
        assert torch.equal(value, resumed_trainer.model.state_dict()[name]), name


def test_eval_command_reports_both_settings(tiny_npz, tmp_path, capsys):
    from accelerate.state import AcceleratorState

    from slca_kit.cli import main

    results = _trainer(tiny_npz, tmp_path, "packnet", {"retrain_epochs": 1}).run()
    AcceleratorState._reset_state()
    assert main(["eval", str(tmp_path / "tiny_packnet")]) == 0
    out = capsys.readouterr().out
    assert f"class-incremental accuracy on 36 test images of 6 classes {results['last_acc']:.2f}%" in out
    assert f"task-incremental accuracy on 36 test images of 6 classes " \
           f"{results['task_incremental']['last_acc']:.2f}%" in out
