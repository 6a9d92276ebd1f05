"""peft adapters from the recipe on the unmodified timm ViT: injection, what trains, merging, checkpoints,
and a custom adapter layer registered through peft (docs/examples/gated_lora.py)."""
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from slca_kit import checkpoint as ckpt
from slca_kit.config import AdapterConfig, BackboneConfig
from slca_kit.resolve import config_from_dict
from slca_kit.errors import ConfigError
from slca_kit.models import build_model
from slca_kit.models.adapters import adapter_types, load_adapter_state_dict
from slca_kit.trainer import ADAPTER_FILE, Trainer

from conftest import TINY_VIT, tiny_recipe

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def _model(adapter: AdapterConfig | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(BackboneConfig(name="vit_tiny_patch16_224", model_kwargs=TINY_VIT), adapter)


def _adapter(**recipe_block) -> AdapterConfig:
    return config_from_dict({"adapter": recipe_block}).adapter


def test_inline_options_go_to_the_peft_config():
    adapter = _adapter(type="lora", r=4, lora_alpha=8)
    assert adapter.options == {"r": 4, "lora_alpha": 8} and adapter.type == "lora"


def test_unknown_adapter_type_and_option():
    with pytest.raises(ConfigError, match="adapter.type: 'lorra' is not a peft tuner"):
        _model(_adapter(type="lorra"))
    with pytest.raises(ConfigError, match="LoraConfig has no option 'lora_alfa' \\(did you mean 'lora_alpha'\\?\\)"):
        _model(_adapter(type="lora", lora_alfa=8))
    with pytest.raises(ConfigError, match="adapter: peft could not inject 'lora'.*nothing"):
        _model(_adapter(type="lora", target_modules=r"nothing\.matches"))


def test_every_peft_tuner_is_offered_by_its_peft_type_name():
    """The list comes from peft's registry, not a hand-kept one: each type either injects and adds trainable
    parameters, or fails with one ConfigError line (e.g. a tuner whose layers need options the ViT lacks)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    types = adapter_types()
    assert {"lora", "dora", "ia3", "loha", "lokr", "oft", "boft", "hra", "vera"} <= set(types)
    assert "prompt_tuning" not in types and "prefix_tuning" not in types  # prompt learning: no layers to inject
    assert len(types) >= len(PEFT_TYPE_TO_CONFIG_MAPPING) - 10
    injected = []
    for name in sorted(types):
        try:
            model = _model(_adapter(type=name))
        except ConfigError as err:
            assert "\n" not in str(err) and name in str(err)
            continue
        assert model.adapter_parameter_names, name
        injected.append(name)
    assert {"lora", "ia3", "loha", "lokr"} <= set(injected)


def test_custom_modules_need_a_tuner_that_registers_them():
    with pytest.raises(ConfigError, match="adapter.custom_modules: peft's IA3Config \(ia3\) takes no custom "
                                          "layers; types that do: .*lora"):
        _model(_adapter(type="ia3", custom_modules={"torch.nn.Linear": "torch.nn.Linear"}))


def test_lora_with_zero_b_leaves_outputs_unchanged_and_skips_patch_embed():
    plain = _model()
    adapted = _model(_adapter(type="lora", r=4))
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(plain.features(x), adapted.features(x), atol=1e-6)  # peft initialises B = 0
    assert type(adapted.backbone.patch_embed.proj) is nn.Conv2d
    assert isinstance(adapted.backbone.blocks[0].attn.qkv, BaseTunerLayer)
    assert isinstance(adapted.backbone.blocks[1].mlp.fc2, BaseTunerLayer)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "loha", "lokr"])
def test_only_adapter_head_and_chosen_backbone_parameters_get_gradients(kind):
    options = {} if kind == "ia3" else {"r": 4}
    model = _model(_adapter(type=kind, train_backbone=["norm"], **options))
    model.head.add_task(3)
    for parameter in model.parameters():  # make every adapter branch non-trivial
        if parameter.requires_grad:
            nn.init.normal_(parameter, std=0.05) if parameter.dim() > 1 else None
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    got = {name for name, p in model.backbone.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = model.adapter_parameter_names | {n for n, _ in model.backbone.named_parameters() if "norm" in n}
    assert model.adapter_parameter_names and got <= expected
    assert any(name in got for name in model.adapter_parameter_names)
    frozen = [n for n, p in model.backbone.named_parameters() if n not in expected]
    assert frozen and all(model.backbone.get_parameter(n).grad is None for n in frozen)


def test_merging_a_trained_lora_gives_the_same_outputs():
    model = _model(_adapter(type="lora", r=4))
    for name, parameter in model.backbone.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    before = model.features(x)
    for module in model.backbone.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    assert torch.allclose(model.features(x), before, atol=1e-5)
    assert not torch.allclose(_model().features(x), before, atol=1e-3)  # the adapter did change the model


def test_adapter_param_group_uses_its_lr_scale(tiny_npz, tmp_path):
    recipe = tiny_recipe(tiny_npz, tmp_path, method="seq_ft_sl", train={"lr": 0.02})
    recipe["adapter"] = {"type": "lora", "r": 4, "lr_scale": 0.5, "train_backbone": ["norm"]}
    trainer = Trainer(config_from_dict(recipe))
    trainer._add_heads_until(0)
    ctx = trainer.context(0)
    trainer.method.before_task(trainer.model, ctx)
    groups = {g["name"]: g for g in trainer.method.param_groups(trainer.model, ctx)}
    assert groups["adapter"]["lr"] == pytest.approx(0.01) and groups["backbone"]["lr"] == pytest.approx(0.0002)
    assert len(groups["adapter"]["params"]) == len(trainer.model.adapter_parameter_names)
    assert all(p.dim() == 1 for p in groups["backbone"]["params"])  # norms only


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "loha"])
def test_adapters_run_end_to_end_and_are_checkpointed_in_peft_format(tiny_npz, tmp_path, kind):
    recipe = tiny_recipe(tiny_npz, tmp_path, method="slca", train={"epochs": 1})
    recipe["adapter"] = {"type": kind, **({} if kind == "ia3" else {"r": 4})}
    trainer = Trainer(config_from_dict(recipe))
    frozen_before = trainer.model.backbone.blocks[0].attn.qkv.base_layer.weight.clone()
    results = trainer.run()
    assert results["complete"] and results["totals"] == [12, 12, 12]
    assert torch.equal(trainer.model.backbone.blocks[0].attn.qkv.base_layer.weight, frozen_before)
    latest = ckpt.latest_checkpoint(tmp_path / "tiny_slca" / "checkpoints")
    saved = load_file(str(latest / ADAPTER_FILE))
    assert saved and all("lora" in k or "ia3" in k or "hada" in k for k in saved)
    # the pretrained backbone rebuilt as the trainer builds it, plus the saved adapter = the trained backbone
    config = config_from_dict(recipe)
    set_seed(config.train.seed)
    fresh = build_model(config.backbone, config.adapter)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(fresh.features(x), trainer.model.eval().features(x), atol=1e-4)
    load_adapter_state_dict(fresh.backbone, saved)
    assert torch.allclose(fresh.features(x), trainer.model.features(x), atol=1e-5)


def test_custom_adapter_layer_from_the_docs(tiny_npz, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    adapter = _adapter(type="lora", r=4, custom_modules={"torch.nn.Linear": "gated_lora.GatedLoraLinear"})
    model = _model(adapter)
    from gated_lora import GatedLoraLinear

    assert isinstance(model.backbone.blocks[0].attn.qkv, GatedLoraLinear)
    assert "blocks.0.attn.qkv.lora_gate.default" in model.adapter_parameter_names
    for name, parameter in model.backbone.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.features(x), _model().features(x), atol=1e-6)  # gate 0: the pretrained model
    model.head.add_task(2)
    model(x).sum().backward()
    assert model.backbone.blocks[0].attn.qkv.lora_gate["default"].grad.abs().item() > 0
    recipe = tiny_recipe(tiny_npz, tmp_path, method="seq_ft_sl", train={"epochs": 1})
    recipe["adapter"] = {"type": "lora", "r": 4, "custom_modules": {"torch.nn.Linear": "gated_lora.GatedLoraLinear"}}
    assert Trainer(config_from_dict(recipe)).run()["complete"]
    with pytest.raises(ConfigError, match="adapter.custom_modules: cannot import 'gated_lora.Missing'"):
        _model(_adapter(type="lora", custom_modules={"torch.nn.Linear": "gated_lora.Missing"}))
