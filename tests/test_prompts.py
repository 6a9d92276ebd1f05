"""Prompt methods on an unmodified timm ViT: insertion, prefixes, key matching, what trains, end-to-end runs."""
import math

import pytest
import timm
import torch

from slca_kit.resolve import config_from_dict
from slca_kit.methods.coda_prompt import gram_schmidt_rows
from slca_kit.methods.l2p import select_top_k
from slca_kit.models.prompts import PrefixAttention, PromptedViT
from slca_kit.trainer import Trainer

from conftest import TINY_VIT, tiny_recipe

PARAMS = {"l2p": {"pool_size": 4, "length": 2, "top_k": 2},
          "dualprompt": {"g_layers": [0], "e_layers": [1], "g_length": 2, "e_length": 2, "e_pool_size": 3},
          "coda_prompt": {"pool_size": 6, "length": 4, "layers": [0, 1]}}


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT).eval()


def _trainer(tiny_npz, tmp_path, method, **train):
    recipe = tiny_recipe(tiny_npz, tmp_path, method=method, backbone={"replace_final_norm": False},
                         train={"epochs": 1, "optimizer": "adam", "lr": 0.01, **train})
    recipe["method"]["params"] = PARAMS[method]
    return Trainer(config_from_dict(recipe))


def test_prompt_tokens_are_inserted_and_removed():
    vit = _vit()
    x = torch.randn(2, 3, 32, 32)
    plain = vit(x)
    prompted = PromptedViT(vit)
    tokens = torch.randn(2, 3, 64)
    with prompted.prompted(tokens=tokens):
        out = vit.forward_features(x)
    assert out.shape == (2, 3 + 1 + 16, 64)
    assert not torch.allclose(out[:, 3], vit.forward_features(x)[:, 0])  # the prompts changed the CLS token
    assert torch.equal(vit(x), plain)  # without prompts: the frozen backbone, unchanged
    assert torch.equal(prompted.query(x), plain)


def test_zero_length_prefixes_equal_the_plain_model():
    vit = _vit()
    x = torch.randn(2, 3, 32, 32)
    plain = vit(x)
    prompted = PromptedViT(vit, prefix_layers=[0, 1])
    assert all(isinstance(block.attn, PrefixAttention) for block in vit.blocks)
    empty = torch.zeros(2, 0, 64)
    with prompted.prompted(prefixes={0: (empty, empty), 1: (empty, empty)}):
        assert torch.allclose(vit(x), plain, atol=1e-5)  # the wrapper's own attention path
    key = torch.randn(2, 3, 64)
    with prompted.prompted(prefixes={1: (key, key)}):
        assert not torch.allclose(vit(x), plain, atol=1e-3)
    assert torch.equal(vit(x), plain)


def test_prefix_attention_equals_attention_over_concatenated_keys_and_values():
    vit = _vit()
    attention = vit.blocks[0].attn
    x = torch.randn(2, 5, 64)
    key, value = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    wrapper = PrefixAttention(attention)
    wrapper.prefix = (key, value)
    out = wrapper(x)
    heads, hd = attention.num_heads, attention.head_dim
    q, k, v = attention.qkv(x).reshape(2, 5, 3, heads, hd).permute(2, 0, 3, 1, 4)
    k = torch.cat([key.reshape(2, 3, heads, hd).transpose(1, 2), k], dim=2)
    v = torch.cat([value.reshape(2, 3, heads, hd).transpose(1, 2), v], dim=2)
    weights = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, 5, 64))
    assert torch.allclose(out, expected, atol=1e-5)


def test_key_matching_on_a_constructed_example():
    keys = torch.eye(4)
    queries = torch.tensor([[0.1, 1.0, 0.0, 0.2], [0.0, 0.9, 0.1, 0.5], [1.0, 0.0, 0.0, 0.3]])
    chosen, similarity = select_top_k(queries, keys, top_k=2, batchwise=False)
    assert chosen.tolist() == [[1, 3], [1, 3], [0, 3]]
    assert similarity.shape == (3, 4)
    chosen, _ = select_top_k(queries, keys, top_k=2, batchwise=True)  # ids 3 (3 votes) and 1 (2 votes)
    assert chosen.tolist() == [[3, 1]] * 3


def test_gram_schmidt_components_are_orthonormal_to_earlier_ones():
    generator = torch.Generator().manual_seed(0)
    first = gram_schmidt_rows(torch.zeros(0, 8), 3, generator)
    second = gram_schmidt_rows(first, 2, generator)
    both = torch.cat([first, second])
    assert torch.allclose(both @ both.T, torch.eye(5), atol=1e-5)


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_only_prompts_keys_and_the_head_train(tiny_npz, tmp_path, method):
    trainer = _trainer(tiny_npz, tmp_path, method)
    trainer._add_heads_until(1)
    ctx = trainer.context(1)
    trainer.method.before_task(trainer.model, ctx)
    prepared = trainer._prepare_training(ctx, epochs=1)
    in_optimizer = {id(p) for g in prepared["optimizer"].optimizer.param_groups for p in g["params"]}
    expected = {id(p) for p in trainer.model.prompts.parameters()} | {id(p) for p in
                                                                      trainer.model.head.heads[1].parameters()}
    assert in_optimizer == expected  # the per-task optimizer holds only trainable parameters
    images, labels = next(iter(prepared["loader"]))
    trainer.model.train()
    trainer.method.training_loss(prepared["model"], images, labels, ctx).backward()
    with_grad = {n for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith(("prompts.", "head.heads.1.")) for n in with_grad)
    trainer.accelerator.free_memory()


def test_dualprompt_uses_the_task_prompt_in_training_and_matching_at_test(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, "dualprompt")
    trainer._add_heads_until(1)
    method, model = trainer.method, trainer.model
    method.before_task(model, trainer.context(1))
    assert torch.equal(model.prompts.e[:, :, 1], model.prompts.e[:, :, 0])  # copied from the previous task
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.prompts.e_keys.copy_(torch.eye(3, 64) * 10)
        query = method.prompted.query(x)
        model.prompts.e_keys[2] = query.mean(0) * 100  # make prompt 2 the best match for every image
        assert method.match(model, query).tolist() == [2, 2, 2, 2]


def test_coda_detaches_earlier_components(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, "coda_prompt")
    trainer._add_heads_until(1)
    method, model = trainer.method, trainer.model
    method.before_task(model, trainer.context(1))
    assert method.active == (2, 4)  # 6 components over 3 tasks
    layer = model.prompts[0]
    flat = layer.components.detach().flatten(1)[:4]
    assert torch.allclose(flat @ flat.T, torch.eye(4), atol=1e-5)
    model.head(model.features(torch.randn(2, 3, 32, 32))).sum().backward()
    assert layer.components.grad[:2].abs().sum() == 0 and layer.components.grad[2:4].abs().sum() > 0
    assert layer.components.grad[4:].abs().sum() == 0  # later tasks' components are not used yet


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_prompt_methods_run_end_to_end(tiny_npz, tmp_path, method):
    trainer = _trainer(tiny_npz, tmp_path, method, epochs=2)
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    results = trainer.run()
    assert results["complete"] and results["totals"] == [12, 12, 12]
    after = trainer.model.backbone.state_dict()
    assert all(torch.equal(after[k.replace(".attn.", ".attn.attention.")] if k not in after else after[k], v)
               for k, v in before.items())  # the backbone is frozen


def test_coda_cosine_is_the_official_quarter_cosine():
    """lr x cos(99 pi e / (200 (K - 1))) at epoch e of K (CODA-Prompt utils/schedulers.py), stepped per epoch."""
    from slca_kit.config import TrainConfig
    from slca_kit.trainer import build_scheduler

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1e-3)
    scheduler = build_scheduler(optimizer, TrainConfig(scheduler="coda_cosine"), epochs=20)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert seen[0] == pytest.approx(1e-3)
    assert seen[10] == pytest.approx(1e-3 * math.cos(99 * math.pi * 10 / (200 * 19)))
    assert seen[19] == pytest.approx(1e-3 * math.cos(0.495 * math.pi))  # ends near 1.6 % of the lr, not at 0
    one = build_scheduler(torch.optim.Adam([parameter], lr=1e-3), TrainConfig(scheduler="coda_cosine"), epochs=1)
    assert one.get_last_lr() == [pytest.approx(1e-3)]  # the official formula divides by zero at K = 1


def test_coda_orthogonality_penalty_leaves_earlier_components_alone(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, "coda_prompt")
    trainer.method.params.ortho_mu = 1.0
    trainer._add_heads_until(1)
    ctx = trainer.context(1)
    trainer.method.before_task(trainer.model, ctx)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([2, 3, 2, 3])
    trainer.model.train()
    trainer.method.training_loss(trainer.model, images, labels, ctx).backward()
    layer = trainer.model.prompts[0]
    for tensor in (layer.components, layer.keys, layer.attention):  # zoo.py:151-153: earlier rows detached
        assert tensor.grad[:2].abs().sum() == 0 and tensor.grad[2:4].abs().sum() > 0


def test_l2p_prompt_init_range(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, "l2p")  # default: the JAX code's U[0, 0.01)
    trainer._add_heads_until(0)
    pool = trainer.model.prompts
    for tensor in (pool.prompts, pool.keys):
        assert 0 <= tensor.min() and tensor.max() < 0.01 and tensor.std() > 0.002
    recipe = tiny_recipe(tiny_npz, tmp_path / "port", method="l2p", backbone={"replace_final_norm": False})
    recipe["method"]["params"] = {**PARAMS["l2p"], "prompt_init_range": [-1.0, 1.0]}  # the PyTorch port
    port_trainer = Trainer(config_from_dict(recipe))
    port_trainer._add_heads_until(0)
    port = port_trainer.model.prompts
    assert port.keys.min() < -0.5 and port.keys.max() > 0.5


def test_dualprompt_batchwise_matching_takes_the_majority(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, "dualprompt")
    trainer._add_heads_until(0)
    method, model = trainer.method, trainer.model
    query = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]).repeat(1, 32)  # 64-d
    with torch.no_grad():
        model.prompts.e_keys.zero_()
        model.prompts.e_keys[0, :2] = torch.tensor([1.0, 0.0])
        model.prompts.e_keys[1, :2] = torch.tensor([0.0, 1.0])
    method.params.batchwise_prompt = False
    assert method.match(model, query).tolist() == [0, 0, 1]
    assert method.evaluation_batch() is None
    method.params.batchwise_prompt = True
    assert method.match(model, query).tolist() == [0, 0, 0]
    assert method.evaluation_batch() == 24  # the official test batch (cifar100_dualprompt.py:4)
