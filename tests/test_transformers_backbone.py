"""backbone.source: transformers — tiny random ViT / DINOv2 / CLIP / SigLIP checkpoints saved in the test and loaded
offline from their folders: the feature is the family's pooled output, the image processor fills in the input
settings, SLCA and a peft LoRA run end to end, resume is exact, and timm-only methods refuse."""
import json
import re

import pytest
import torch
import yaml

from slca_kit.errors import ConfigError
from slca_kit.methods import METHODS
from slca_kit.methods.packnet import PackNet
from slca_kit.models import build_model
from slca_kit.models.hf_backbone import fill_image_settings
from slca_kit.resolve import config_from_dict, load_config
from slca_kit.trainer import Trainer

from conftest import Interrupted, interrupt_before_epoch, tiny_recipe

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)
PROCESSOR_MEAN = [0.25, 0.5, 0.75]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Folders as save_pretrained writes them. The ViT carries a pooler (like google/vit-base-patch16-224-in21k)
    and an image processor; the CLIP one is a full CLIP model (text tower too) whose processor centre-crops."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    folders = {}
    models = {
        "vit": transformers.ViTModel(transformers.ViTConfig(**TINY), add_pooling_layer=True),
        "dinov2": transformers.Dinov2Model(transformers.Dinov2Config(**TINY)),
        "clip": transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=TINY, projection_dim=16,
            text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))),
        "siglip": transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY)),
    }
    for name, model in models.items():
        folders[name] = root / name
        model.save_pretrained(folders[name])
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=PROCESSOR_MEAN,
                                   image_std=[0.5, 0.5, 0.5]).save_pretrained(folders["vit"])
    transformers.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(folders["clip"])
    return folders


def _recipe(npz, tmp_path, folder, method="slca", **sections):
    recipe = tiny_recipe(npz, tmp_path, method=method, **sections)
    recipe["backbone"] = {"source": "transformers", "name": str(folder), "replace_final_norm": False}
    for key in ("mean", "std", "image_size"):  # from the checkpoint's image processor
        recipe["data"].pop(key)
    recipe["data"]["mean"], recipe["data"]["std"] = [0.5] * 3, [0.5] * 3
    if not (folder / "preprocessor_config.json").exists():
        recipe["data"]["image_size"] = 32
    return recipe


def _config(recipe):
    config = config_from_dict(recipe)
    fill_image_settings(config)
    return config


@pytest.mark.parametrize("family", ["vit", "dinov2", "clip", "siglip"])
def test_the_feature_is_the_checkpoints_own_pooled_output(tiny_npz, tmp_path, checkpoints, family):
    config = _config(_recipe(tiny_npz, tmp_path, checkpoints[family]))
    model = build_model(config.backbone).eval()
    images = torch.randn(3, 3, 32, 32)
    reference_class = {"vit": transformers.ViTModel, "dinov2": transformers.Dinov2Model,
                       "clip": transformers.CLIPVisionModel, "siglip": transformers.SiglipVisionModel}[family]
    reference = reference_class.from_pretrained(checkpoints[family]).eval()
    with torch.no_grad():
        output = reference(pixel_values=images)
        # ViT: the CLS token after the final LayerNorm, not the pooler's tanh(dense(CLS)) (hf_backbone docstring)
        expected = output.last_hidden_state[:, 0] if family == "vit" else output.pooler_output
        assert torch.allclose(model.features(images), expected, atol=1e-6)
    assert model.backbone.num_features == 32
    if family == "vit":  # the pooler is not built: every backbone parameter shapes the feature
        assert not any("pooler" in name for name, _ in model.backbone.named_parameters())
    if family == "dinov2":  # masked-image pretraining's token is frozen (no gradient would reach it under DDP)
        assert not model.backbone.model.embeddings.mask_token.requires_grad


def test_replace_final_norm_puts_a_fresh_layernorm_where_the_feature_is_normalised(tiny_npz, tmp_path, checkpoints):
    recipe = _recipe(tiny_npz, tmp_path, checkpoints["clip"])
    recipe["backbone"]["replace_final_norm"] = True
    norm = build_model(_config(recipe).backbone).backbone.model.post_layernorm
    assert torch.equal(norm.weight, torch.ones(32)) and torch.equal(norm.bias, torch.zeros(32))
    recipe = _recipe(tiny_npz, tmp_path, checkpoints["siglip"])
    recipe["backbone"]["replace_final_norm"] = True
    with pytest.raises(ConfigError, match="replace_final_norm: .*attention-pooling head"):
        build_model(_config(recipe).backbone)


def test_image_processor_fills_what_the_recipe_leaves_unset(tiny_npz, tmp_path, checkpoints):
    recipe = _recipe(tiny_npz, tmp_path, checkpoints["vit"])
    del recipe["data"]["mean"], recipe["data"]["std"]
    recipe["data"]["benchmark"] = "flowers102_proxy"  # its preset's ImageNet mean must not win over the processor
    config = config_from_dict(recipe)
    assert config.data.mean is None and config.data.image_size is None
    fill_image_settings(config)
    assert config.data.mean == PROCESSOR_MEAN and config.data.std == [0.5] * 3 and config.data.image_size == 32
    # the recipe's own values win over the processor's
    recipe["data"].update(mean=[0.1, 0.2, 0.3], image_size=48)
    config = _config(recipe)
    assert config.data.mean == [0.1, 0.2, 0.3] and config.data.image_size == 48 and config.data.std == [0.5] * 3
    # CLIP's processor resizes the short side to 40 and centre-crops 32: the model sees 32
    config = _config(_recipe(tiny_npz, tmp_path, checkpoints["clip"]))
    assert config.data.image_size == 32 and config.data.mean == [0.5] * 3  # the recipe set mean / std


def test_a_checkpoint_without_image_processor_needs_the_recipes_values(tiny_npz, tmp_path, checkpoints):
    recipe = _recipe(tiny_npz, tmp_path, checkpoints["dinov2"])
    del recipe["data"]["image_size"]
    with pytest.raises(ConfigError, match=r"data.image_size: not set, and .*dinov2 has no image processor"):
        _config(recipe)
    recipe["data"]["image_size"] = 32
    assert _config(recipe).data.image_size == 32


def _two_task_recipe(npz, tmp_path, folder, **sections):
    recipe = _recipe(npz, tmp_path, folder, **sections)
    recipe["scenario"] = {"increment": 3, "class_order_seed": 1993}
    return recipe


def test_slca_on_a_transformers_vit_resumes_exactly(tiny_npz, tmp_path, checkpoints):
    train = {"epochs": 2, "batch_size": 16, "lr": 0.05, "checkpoint_every_epoch": True, "keep_checkpoints": 10}
    reference_trainer = Trainer(_config(_two_task_recipe(tiny_npz, tmp_path / "ref", checkpoints["vit"],
                                                         train=train)))
    reference = reference_trainer.run()
    assert reference["complete"] and len(reference["accuracy_matrix"]) == 2
    saved = json.loads((tmp_path / "ref" / "tiny_slca" / "results.json").read_text())
    assert saved["provenance"]["backbone"]["transformers_name"] == str(checkpoints["vit"])
    assert re.fullmatch(r"[0-9a-f]{64}", saved["provenance"]["backbone"]["files_sha256"])
    written = yaml.safe_load((tmp_path / "ref" / "tiny_slca" / "config.yaml").read_text())
    assert written["data"]["image_size"] == 32  # the processor's value, recorded with the run

    interrupted = Trainer(_config(_two_task_recipe(tiny_npz, tmp_path / "cut", checkpoints["vit"], train=train)))
    interrupt_before_epoch(interrupted, task=1, epoch=1)
    with pytest.raises(Interrupted):
        interrupted.run()
    resumed_trainer = Trainer(_config(_two_task_recipe(tiny_npz, tmp_path / "cut", checkpoints["vit"],
                                                       train=train)))
    resumed = resumed_trainer.run(resume=True)
    assert resumed["correct"] == reference["correct"]
    for name, value in reference_trainer.model.state_dict().items():
        assert torch.equal(value, resumed_trainer.model.state_dict()[name]), name


def test_a_peft_lora_trains_only_the_adapter_on_transformers_module_names(tiny_npz, tmp_path, checkpoints):
    adapter = {"type": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    recipe = _two_task_recipe(tiny_npz, tmp_path, checkpoints["dinov2"], method="seq_ft_sl", adapter=adapter)
    trainer = Trainer(_config(recipe))
    before = {n: p.detach().clone() for n, p in trainer.model.backbone.named_parameters()}
    lora = sorted(n for n in before if "lora_" in n)
    assert len(lora) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    assert trainer.model.adapter_parameter_names == set(lora)
    results = trainer.run()
    assert results["complete"]
    after = dict(trainer.model.backbone.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and moved <= set(lora)  # the pretrained weights never move
    assert any(n.endswith("lora_B.default.weight") for n in moved)


def test_bf16_runs_on_a_transformers_backbone(tiny_npz, tmp_path, checkpoints):
    from accelerate.state import AcceleratorState

    def recipe(folder, precision):
        return _two_task_recipe(tiny_npz, tmp_path / folder, checkpoints["clip"],
                                train={"epochs": 1, "mixed_precision": precision})

    fp32 = Trainer(_config(recipe("fp32", "no"))).run()
    AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process otherwise
    try:
        trainer = Trainer(_config(recipe("bf16", "bf16")))
        bf16 = trainer.run()
        seen = []
        fc1 = trainer.model.backbone.model.encoder.layers[0].mlp.fc1
        handle = fc1.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        with trainer.accelerator.autocast():  # the transformers model's matmuls run in bf16 under accelerate
            trainer.model.features(torch.randn(2, 3, 32, 32))
        handle.remove()
        assert seen == [torch.bfloat16]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert bf16["complete"] and trainer.method.covs.dtype == torch.float32
    assert abs(bf16["last_acc"] - fp32["last_acc"]) <= 20  # bf16 rounding may flip a few of 36 predictions


def test_adapter_targets_name_the_available_modules_when_nothing_matches(tiny_npz, tmp_path, checkpoints):
    recipe = _two_task_recipe(tiny_npz, tmp_path, checkpoints["siglip"], method="seq_ft_sl",
                              adapter={"type": "lora", "r": 2, "target_modules": ["query", "value"]})
    with pytest.raises(ConfigError, match=r"Linear modules are named .*q_proj.*v_proj"):
        build_model(_config(recipe).backbone, _config(recipe).adapter)


@pytest.mark.parametrize("method, params", [("l2p", {}), ("dualprompt", {}), ("coda_prompt", {}), ("inflora", {}),
                                            ("pnn", {"column": "adapter"})])
def test_methods_that_hook_timm_blocks_refuse_a_transformers_backbone(tiny_npz, tmp_path, checkpoints, method,
                                                                       params):
    recipe = _recipe(tiny_npz, tmp_path, checkpoints["vit"], method=method)
    recipe["method"]["params"] = params
    with pytest.raises(ConfigError, match=rf"backbone.source: method {method} supports timm backbones only"):
        config_from_dict(recipe)


def test_packnet_packs_every_linear_weight_on_both_sources(tiny_npz, tmp_path, checkpoints):
    timm_config = config_from_dict(tiny_recipe(tiny_npz, tmp_path, method="packnet"))
    timm_model = build_model(timm_config.backbone)
    packed = PackNet(PackNet.Params(), timm_config).packed(timm_model)
    # the same set the former default regex named on timm's ViT
    old_default = re.compile(r"backbone\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])\.weight")
    assert set(packed) == {n for n, _ in timm_model.named_parameters() if old_default.fullmatch(n)}
    hf_config = _config(_recipe(tiny_npz, tmp_path, checkpoints["vit"], method="packnet"))
    hf_packed = PackNet(PackNet.Params(), hf_config).packed(build_model(hf_config.backbone))
    suffixes = {name.split(".")[-2] for name in hf_packed}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"} and len(hf_packed) == 12


@pytest.mark.parametrize("backbone, adapter, message", [
    ({"weights": "w.safetensors"}, None, r"backbone.weights: timm only"),
    ({"drop_path_rate": 0.1}, None, r"backbone.drop_path_rate: timm only; .*model_kwargs"),
    ({}, {"type": "lora"}, r"adapter.target_modules: required with backbone.source transformers"),
    ({"source": "keras"}, None, r"backbone.source: 'keras' is not one of timm, transformers"),
])
def test_bad_transformers_settings_get_one_error_line(tiny_npz, tmp_path, checkpoints, backbone, adapter, message):
    recipe = _recipe(tiny_npz, tmp_path, checkpoints["vit"])
    recipe["backbone"].update(backbone)
    if adapter:
        recipe["adapter"] = adapter
    with pytest.raises(ConfigError, match=message):
        config_from_dict(recipe)


def test_a_folder_that_is_not_a_supported_vision_checkpoint_is_named(tiny_npz, tmp_path):
    bert = tmp_path / "bert"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(bert)
    recipe = _recipe(tiny_npz, tmp_path, bert)
    with pytest.raises(ConfigError, match=r"is a 'bert' checkpoint; backbone.source transformers supports clip"):
        build_model(_config(recipe).backbone)
    recipe["backbone"]["name"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"backbone.name: cannot load a transformers config from .*missing"):
        build_model(_config(recipe).backbone)


def test_pretrained_false_builds_the_checkpoints_architecture_at_random(tiny_npz, tmp_path, checkpoints):
    recipe = _recipe(tiny_npz, tmp_path, checkpoints["clip"])
    recipe["backbone"]["pretrained"] = False
    random_model = build_model(_config(recipe).backbone)
    loaded = transformers.CLIPVisionModel.from_pretrained(checkpoints["clip"])
    weight = "encoder.layers.0.mlp.fc1.weight"
    assert random_model.backbone.model.state_dict()[weight].shape == loaded.state_dict()[weight].shape
    assert not torch.equal(random_model.backbone.model.state_dict()[weight], loaded.state_dict()[weight])


def test_timm_recipes_resolve_as_before():
    config = load_config(None)
    assert config.backbone.source == "timm" and config.backbone.pretrained is False
    assert config.adapter.target_modules == r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"


TRANSFORMERS_METHODS = sorted(name for name, cls in METHODS.items()
                              if "transformers" in cls.backbone_sources(cls.Params()))


def test_the_methods_that_need_only_features_are_the_documented_ones():
    assert TRANSFORMERS_METHODS == sorted(
        ["seq_ft", "seq_ft_sl", "slca", "slca_pp", "joint", "linear_probe", "ewc", "mas", "si", "lwf",
         "replay", "generative_replay", "packnet", "pnn", "den", "fecam", "cofima"])


@pytest.mark.parametrize("method", TRANSFORMERS_METHODS)
def test_every_feature_method_runs_on_a_transformers_vit(tiny_npz, tmp_path, checkpoints, method):
    sections = {"train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "eval_batch_size": 32}}
    if method == "slca_pp":  # SLCA++'s LoRA on the separate q / k / v projections (docs/backbones.md)
        sections["adapter"] = {"type": "lora", "r": 2, "lora_alpha": 1.6,
                               "target_modules": ["q_proj", "k_proj", "v_proj"],
                               "train_backbone": ["norm", "bias", "cls_token"]}
    recipe = _two_task_recipe(tiny_npz, tmp_path, checkpoints["vit"], method=method, **sections)
    recipe["method"]["params"] = {"packnet": {"retrain_epochs": 1}, "cofima": {"fisher_batch_size": 16}}.get(method, {})
    results = Trainer(_config(recipe)).run()
    assert results["complete"] and results["totals"] == [18, 18]
    assert 0 <= results["last_acc"] <= 100


def test_a_local_checkpoint_is_fingerprinted_by_its_weight_files(tmp_path):
    import hashlib

    from slca_kit.provenance import checkpoint_fingerprint

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")  # not a weight file: changes nothing
    line = f"model.safetensors {hashlib.sha256(b'weights').hexdigest()}\n"
    assert checkpoint_fingerprint(str(tmp_path), None) == {
        "revision": None, "files_sha256": hashlib.sha256(line.encode()).hexdigest()}
    assert checkpoint_fingerprint("google/vit-base-patch16-224-in21k", "abc123") == {
        "revision": "abc123", "files_sha256": None}


@pytest.mark.parametrize("method", ["ranpac", "aper"])
def test_first_session_methods_run_on_a_transformers_vit_without_adaptation(tiny_npz, tmp_path, checkpoints, method):
    recipe = _two_task_recipe(tiny_npz, tmp_path, checkpoints["vit"], method=method)
    recipe["method"]["params"] = {"first_session": "none", **({"projection_dim": 32} if method == "ranpac" else {})}
    results = Trainer(_config(recipe)).run()
    assert results["complete"] and results["totals"] == [18, 18]
