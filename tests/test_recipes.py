"""Every shipped recipe resolves to a valid config (paths to absent weights are faked where a user would set them)."""
import re
from pathlib import Path

import pytest

from slca_kit.errors import ConfigError
from slca_kit.recipe_files import find_recipe, packaged_recipes, recipes_root
from slca_kit.resolve import load_config

from conftest import shared_path

RECIPES = recipes_root()
PAPER = sorted(p for p in RECIPES.glob("*/*.yaml")
               if not p.name.startswith("_") and p.parent.name not in ("proxy", "demo", "digits"))


@pytest.mark.parametrize("recipe", PAPER, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_paper_recipes_resolve(recipe, tmp_path, monkeypatch):
    fake = tmp_path / "mocov3-vit-base-300ep.pth"
    fake.write_bytes(b"")
    monkeypatch.setenv("MOCOV3_WEIGHTS", str(fake))
    cfg = load_config(recipe)
    variants = {"online_ewc": "ewc", "pnn_adapter": "pnn", "slca_hf_vit": "slca", "aper_ssf": "aper",
                "aper_vpt": "aper"}
    assert cfg.method.name == variants.get(recipe.stem, recipe.stem.replace("_mocov3", ""))
    if recipe.stem == "slca_hf_vit":  # the image processor, not the CIFAR preset, sets size and normalisation
        assert cfg.backbone.source == "transformers" and cfg.backbone.pretrained
        assert cfg.data.mean is None and cfg.data.image_size is None and cfg.data.transform == "cifar"
    if recipe.stem == "online_ewc":
        assert cfg.method.params.online and cfg.method.params.gamma == 1.0
    if cfg.method.name == "replay":
        assert cfg.method.params.memory_size == 2000 and cfg.method.params.selection == "herding"
    if cfg.method.name == "slca_pp":
        assert cfg.adapter.type == "lora" and cfg.adapter.options["r"] == 4 and cfg.adapter.options["lora_alpha"] == 3.2
        hard = recipe.parent.name in ("imagenet_r", "cars196")
        assert (cfg.method.params.ce_weight, cfg.method.params.rce_weight) == ((0.5, 0.5) if hard else (1.0, 0.1))
        assert cfg.train.weight_decay == (0.0 if hard else 5e-4) and cfg.train.eta_min == pytest.approx(1e-4)
    assert cfg.data.benchmark == recipe.parent.name
    if "mocov3" in recipe.stem:
        assert cfg.backbone.weights_key == "model" and cfg.train.epochs == 90 and cfg.train.milestones == [80]
    else:
        in1k = (cfg.method.name == "ranpac" and recipe.parent.name in ("cub200", "imagenet_r")  # args/*_publish.csv
                or cfg.method.name == "sd_lora")  # "vit_base_patch16_224" (exps/sdlora_*.json)
        expected = ("google/vit-base-patch16-224-in21k" if recipe.stem == "slca_hf_vit"
                    else "vit_base_patch16_224.augreg_in21k_ft_in1k" if in1k
                    else "vit_base_patch16_224.orig_in21k" if cfg.method.name == "hide_prompt"  # ViT-B_16.npz
                    else "vit_base_patch16_224.augreg_in21k")
        assert cfg.backbone.name == expected and cfg.backbone.pretrained
        if cfg.method.name not in ("l2p", "dualprompt", "ranpac", "aper", "ease", "mos", "sd_lora",
                                   "hide_prompt"):  # own epochs
            assert cfg.train.epochs == (20 if recipe.parent.name == "cifar100" else 50)
    if cfg.method.name == "ranpac":  # RanPAC/RanPAC args/*_publish.csv row 7
        assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay) == (20, 48, 0.01, 5e-4)
        first_sessions = {"imagenet_r": "ssf", "cars196": "vpt_deep"}  # model_name of the publish.csv rows
        assert cfg.method.params.projection_dim == 10000
        assert cfg.method.params.first_session == first_sessions.get(recipe.parent.name, "adapter")
        assert cfg.data.mean == [0.0] * 3 and cfg.data.std == [1.0] * 3 and not cfg.backbone.replace_final_norm
        assert cfg.data.transform == ("pilot_cifar" if recipe.parent.name == "cifar100" else "pilot")
        if recipe.parent.name == "cars196":
            assert cfg.scenario.init_classes == 16 and cfg.data.split == "official"
    if cfg.method.name == "cofima":  # IemProg/CoFiMA exps/cofima/cofima_*.json
        assert cfg.method.params.wt_alpha == (0.4 if recipe.parent.name in ("cifar100", "imagenet_r") else 0.5)
        assert cfg.method.params.fisher_max == 1e-4 and cfg.method.params.fisher_batch_size == 128
    if cfg.method.name == "aper":  # zhoudw-zdw/RevisitingCIL exps/aper_{adapter,ssf,vpt-deep}/*.json
        increment = {"cifar100": 5, "imagenet_r": 5, "cub200": 10, "cars196": 20}[recipe.parent.name]
        variant = {"aper": "adapter", "aper_ssf": "ssf", "aper_vpt": "vpt_deep"}[recipe.stem]
        expected = {"adapter": (20, 0.05, 24) if recipe.parent.name == "imagenet_r" else (20, 0.01, 48),
                    "ssf": (20, 0.01, 48), "vpt_deep": (5, 0.05, 16)}[variant]
        assert cfg.method.params.first_session == variant and cfg.scenario.increment == increment
        assert (cfg.train.epochs, cfg.train.lr, cfg.train.batch_size) == expected
        assert cfg.method.params.adapter_bottleneck == 64 and cfg.method.params.prompt_tokens == 5
        assert cfg.data.mean == [0.0] * 3 and cfg.train.scheduler == "cosine" and cfg.train.eta_min == 0.0
    if cfg.method.name == "ease":  # sun-hailong/CVPR24-Ease exps/ease_*_in21k.json
        expected = {"cifar100": (5, 0.025, 48, 5e-4, 0.1), "imagenet_r": (20, 0.05, 16, 0.005, 0.1),
                    "cub200": (10, 0.008, 32, 5e-4, 0.05), "cars196": (20, 0.008, 32, 5e-4, 0.05)}[recipe.parent.name]
        assert (cfg.scenario.increment, cfg.train.lr, cfg.train.batch_size, cfg.train.weight_decay,
                cfg.method.params.alpha) == expected
        assert cfg.train.epochs == 20 and cfg.train.scheduler == "cosine" and cfg.data.transform == "pilot"
        assert cfg.data.mean == [0.0] * 3 and not cfg.method.params.use_init_ptm
    if cfg.method.name == "mos":  # sun-hailong/AAAI25-MOS exps/mos_*_in21k.json (Cars: the CUB values)
        expected = {"cifar100": (5, 20, 0.03, 48, 5e-4), "imagenet_r": (20, 10, 0.05, 16, 0.005),
                    "cub200": (10, 10, 0.01, 32, 5e-4), "cars196": (20, 10, 0.01, 32, 5e-4)}[recipe.parent.name]
        assert (cfg.scenario.increment, cfg.train.epochs, cfg.train.lr, cfg.train.batch_size,
                cfg.train.weight_decay) == expected
        params = cfg.method.params
        assert params.ca_weight_decay == cfg.train.weight_decay and params.samples_per_class == 5 * expected[3]
        assert params.adapter_bottleneck == 16 and params.adapter_momentum == 0.1 and params.ca_epochs == 30
        assert cfg.train.scheduler == "cosine" and cfg.data.transform == "pilot" and cfg.data.mean == [0.0] * 3
    if cfg.method.name == "sd_lora":  # WuYichen-97/SD-Lora-CL exps/sdlora_c100.json, sdlora_inr.json
        expected = {"cifar100": (10, 0.008)}.get(recipe.parent.name, (20, 0.01))
        assert (cfg.scenario.increment, cfg.train.lr) == expected and cfg.method.params.rank == 10
        assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.weight_decay, cfg.train.scheduler) == (
            20, 128, 0.0, "constant")
        assert cfg.method.params.rank_reduction == [] and cfg.data.mean == [0.0] * 3
    if cfg.method.name == "hide_prompt":  # thu-ml/HiDe-Prompt training_scripts/train_{cifar100,imr,cub}_vit.sh
        expected = {"cifar100": (5, 0.1, 0.1, 50, "multistep", 4.6875e-5), "imagenet_r": (20, 0.5, 0.1, 150, "cosine",
                                                                                          4.6875e-5),
                    "cub200": (20, 0.01, 1.0, 50, "multistep", 0.0009375)}.get(recipe.parent.name)
        params = cfg.method.params
        assert (params.e_length, params.orthogonality_weight, params.head_lr_scale, cfg.train.epochs,
                cfg.train.scheduler, params.tii_lr) == (expected or (20, 0.01, 1.0, 50, "multistep", 0.0009375))
        assert cfg.train.lr == pytest.approx(0.03 * 24 / 256) and cfg.train.batch_size == 24
        assert cfg.train.milestones == [31] or cfg.train.scheduler == "cosine"
        assert params.tii_ca_lr == pytest.approx(0.005 * 24 / 256) and params.ca_lr == 0.005
        assert params.statistics == "multi_centroid" and params.centroids == 10 and params.prompt_momentum == 0.01
        assert cfg.scenario.class_order_seed is None and cfg.train.grad_clip == 1.0
    if cfg.method.name == "fecam":  # dipamgoswami/FeCAM FeCAM_vit_*.py
        cifar = recipe.parent.name == "cifar100"
        assert (cfg.method.params.shrink_diagonal, cfg.method.params.shrink_off_diagonal) == ((1.0, 0.0) if cifar
                                                                                             else (10.0, 10.0))
        assert cfg.data.mean == [0.0] * 3 and not cfg.backbone.replace_final_norm
        if recipe.parent.name in ("cifar100", "imagenet_r"):
            assert cfg.scenario.class_order_seed is None
    cifar = recipe.parent.name == "cifar100"
    if cfg.method.name in ("l2p", "dualprompt", "coda_prompt", "inflora"):
        assert cfg.backbone.replace_final_norm is False and cfg.train.optimizer == "adam"
    if cfg.method.name == "dualprompt":  # dualprompt-pytorch configs: lr x batch / 256, clip 1, batch-wise on CIFAR
        assert cfg.method.params.e_length == (5 if cifar else 20) and cfg.train.batch_size == 24
        assert cfg.train.lr == pytest.approx((0.03 if cifar else 0.005) * 24 / 256) and cfg.train.grad_clip == 1.0
        assert cfg.method.params.batchwise_prompt is cifar and cfg.train.epochs == (5 if cifar else 50)
    if cfg.method.name == "l2p":  # CIFAR: the JAX config; others: DualPrompt's ImageNet-R protocol
        assert cfg.method.params.prompt_init_range == [0.0, 0.01] and cfg.train.grad_clip == 1.0
        assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == ((0.015, 128, 5) if cifar else
                                                                          (0.005 * 24 / 256, 24, 50))
    if cfg.method.name in ("coda_prompt", "inflora"):
        assert cfg.train.scheduler == "coda_cosine" and cfg.train.batch_size == 128
    if cfg.method.name == "inflora":
        assert cfg.train.lr == 5e-4
        assert cfg.method.params.rank == 10 and cfg.method.params.lamb == (0.95 if cifar else 0.98)
    if cfg.method.name == "slca_pp":  # the released code trains the qkv LoRA only
        assert cfg.adapter.target_modules == r"blocks\.\d+\.attn\.qkv"
        hard = recipe.parent.name in ("imagenet_r", "cars196")
        assert cfg.method.params.ca_weight_decay == (0.0 if hard else 5e-4)
    if cfg.method.name in ("slca", "slca_pp"):
        assert cfg.method.params.logit_norm_tau == (0.05 if recipe.parent.name == "cars196" else 0.1)


@pytest.mark.parametrize("method", ["seq_ft", "seq_ft_sl", "slca", "slca_pp", "inflora", "l2p",
                                    "dualprompt", "coda_prompt", "joint", "linear_probe", "ewc", "online_ewc", "mas",
                                    "si", "lwf", "replay", "generative_replay", "packnet", "pnn", "pnn_adapter",
                                    "den", "ranpac", "fecam", "cofima", "aper", "aper_ssf", "aper_vpt",
                                    "ease", "mos", "sd_lora", "hide_prompt"])
def test_proxy_recipes_resolve(method, monkeypatch):
    shared = shared_path()
    monkeypatch.setenv("SLCA_SHARED", str(shared))
    cfg = load_config(RECIPES / "proxy" / f"{method}.yaml")
    assert cfg.data.path == str(shared / "data" / "flowers102_32.npz") and cfg.scenario.remainder == "merge"


def test_digits_recipe_stays_available_by_name():
    cfg = load_config(find_recipe("digits/slca"))
    assert cfg.data.source == "digits" and cfg.method.name == "slca" and cfg.backbone.weights is None


@pytest.mark.parametrize("method", ["slca", "seq_ft_sl", "seq_ft"])
def test_demo_recipes_read_the_glyph_backbone_from_the_cache(method, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SLCA_KIT_CACHE", raising=False)
    with pytest.raises(ConfigError, match=re.escape(f"file not found: {tmp_path}/.cache/slca_kit/glyph_vit_v1")):
        load_config(find_recipe(f"demo/{method}"))  # ~ expanded to $HOME
    cache = tmp_path / "elsewhere"
    cache.mkdir()
    for suffix in (".json", ".safetensors"):
        (cache / f"glyph_vit_v1{suffix}").write_text("{}")
    monkeypatch.setenv("SLCA_KIT_CACHE", str(cache))
    cfg = load_config(find_recipe(f"demo/{method}"))
    assert cfg.backbone.weights == str(cache / "glyph_vit_v1.safetensors") and cfg.method.name == method
    assert cfg.data.benchmark == "digits" and (cfg.train.epochs, cfg.train.milestones, cfg.train.lr) == (10, [8], 0.01)
    assert cfg.method.params.backbone_lr_scale == (1.0 if method == "seq_ft" else 0.01)  # bcb_lrscale


SOURCE = re.compile(r"[A-Za-z0-9_-]+/[A-Za-z0-9_.-]+ [^\n]*?[A-Za-z0-9_/.-]+\.(py|json|yaml)")


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_names_the_file_its_values_come_from(recipe):
    header = "".join(line for line in recipe.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert SOURCE.search(header), f"{recipe}: no 'owner/repository path/file' in its comments"


def test_recipes_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_recipe("cifar100/slca") == RECIPES / "cifar100" / "slca.yaml"
    assert find_recipe("proxy/seq_ft_sl.yaml") == RECIPES / "proxy" / "seq_ft_sl.yaml"
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    assert find_recipe("mine.yaml") == Path("mine.yaml")  # a file wins
    with pytest.raises(ConfigError, match=r"recipe 'cifar100/slcaa': no such file, and no packaged recipe of that "
                                          r"name; did you mean cifar100/slca"):
        find_recipe("cifar100/slcaa")
    with pytest.raises(ConfigError, match="no packaged recipe"):
        find_recipe("cifar100/_base")  # only extended, never run
    names = packaged_recipes()
    # 33 per paper benchmark, 31 proxy, cifar100/slca_hf_vit, 3 demo, digits/slca
    assert len(names) == 4 * 33 + 31 + 1 + 3 + 1 and "imagenet_r/slca_pp" in names
    assert "demo/slca" in names and "digits/slca" in names and not any("_base" in n for n in names)


def test_published_targets_name_packaged_recipes_and_match_the_reference_notes():
    from slca_kit.published import load_targets

    targets = load_targets()
    assert {t.table for t in targets} == {"slca_table1", "method_papers", "proxy"}
    assert all(t.recipe in packaged_recipes() and t.metric in ("last_acc", "inc_acc") for t in targets)
    assert all(t.tolerance >= 1.0 and (t.std is None or t.tolerance >= 2 * t.std - 1e-9) for t in targets)
    cells = {(t.table, t.recipe, t.metric): t for t in targets}
    assert len(cells) == len(targets)  # one row per cell
    # spot checks against ../shared/reference/paper_tables.md (SLCA Table 1)
    assert (cells["slca_table1", "cars196/slca_pp", "last_acc"].value,
            cells["slca_table1", "cars196/slca_pp", "last_acc"].std) == (73.97, 0.22)
    assert cells["slca_table1", "imagenet_r/seq_ft_sl", "inc_acc"].value == 76.84
    assert cells["method_papers", "cifar100/inflora", "last_acc"].std == 0.73
    assert cells["proxy", "proxy/seq_ft_sl", "inc_acc"].std == 3.18
    joint = cells["proxy", "proxy/joint", "last_acc"]  # three seeds: tolerance max(1, 2 std)
    assert (joint.value, joint.std, joint.tolerance) == (54.69, 0.81, 1.62)
    assert cells["proxy", "proxy/slca_pp", "last_acc"].tolerance == 4.0  # one run: the proxy's seed spread
