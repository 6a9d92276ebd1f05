import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from slca_kit.config import BackboneConfig
from slca_kit.errors import CheckpointError
from slca_kit.models import build_model, create_backbone, load_weights_file
from slca_kit.models.heads import IncrementalHead

from conftest import TINY_VIT, shared_path


def _tiny(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**TINY_VIT, **kwargs})


def test_feature_is_the_cls_token_after_the_final_norm():
    model = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", model_kwargs=TINY_VIT))
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    assert torch.allclose(model(x), tokens[:, 0])
    assert model.num_features == 64


def test_replace_final_norm_is_a_fresh_layernorm():
    model = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", model_kwargs=TINY_VIT))
    assert isinstance(model.norm, torch.nn.LayerNorm) and model.norm.eps == 1e-5
    assert torch.equal(model.norm.weight, torch.ones(64)) and torch.equal(model.norm.bias, torch.zeros(64))
    kept = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", model_kwargs=TINY_VIT,
                                          replace_final_norm=False))
    assert kept.norm.eps == 1e-6  # timm's own


def test_load_safetensors_ignores_classifier(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", num_classes=7, **TINY_VIT)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    target = _tiny()
    load_weights_file(target, path)
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_load_pth_with_key_and_wrapper_prefix(tmp_path):
    """MoCo v3 style: a dict with 'model', keys under module.base_encoder."""
    source = _tiny()
    state = {f"module.base_encoder.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "moco.pth"
    torch.save({"model": state, "epoch": 300}, path)
    target = _tiny()
    load_weights_file(target, path, key="model")
    assert torch.equal(target.pos_embed, source.pos_embed)
    with pytest.raises(CheckpointError, match="has no entry 'state'; top-level entries: \\['model', 'epoch'\\]"):
        load_weights_file(_tiny(), path, key="state")


def test_card_config_builds_the_proxy(tmp_path):
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"config": {**TINY_VIT, "num_classes": 100}}))
    model = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", card=str(card)))
    assert len(model.blocks) == 2 and model.num_features == 64 and model.num_classes == 0


def test_shared_proxy_backbone_loads():
    weights = shared_path("weights", "vit_proxy_tin100.safetensors")
    card = shared_path("weights", "vit_proxy_tin100.json")
    model = build_model(BackboneConfig(name="vit_tiny_patch16_224", card=str(card), weights=str(weights)))
    assert len(model.backbone.blocks) == 6 and model.backbone.num_features == 192
    model.head.add_task(10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_incremental_head_concatenates_tasks():
    head = IncrementalHead(4)
    first = head.add_task(3)
    second = head.add_task(2)
    assert head.task_sizes == [3, 2] and head.num_classes == 5
    assert torch.equal(first.bias, torch.zeros(3)) and first.weight.std() < 0.05
    x = torch.randn(5, 4)
    assert torch.allclose(head(x), torch.cat([first(x), second(x)], dim=1))
