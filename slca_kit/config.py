"""Typed run configuration: YAML recipe (with ``extends``) + ``key=value`` overrides -> validated dataclasses.

Every hyper-parameter has the paper's / reference code's value as its default, with the source in a comment.
Method-specific hyper-parameters live in each method's own ``Params`` dataclass (see ``slca_kit.methods``). This is
the bottom layer: it imports neither ``data`` nor ``methods``; ``slca_kit.resolve`` merges benchmark presets and
types method parameters on top of it.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass
class DataConfig:
    # A named benchmark preset (cifar100, imagenet_r, cub200, cars196, flowers102_proxy, digits) fills the
    # fields below; any field set in the recipe wins over the preset.
    benchmark: str | None = None
    # Where the images come from: digits (scikit-learn's, embedded), arrays (.npz), imagefolder, hub.
    source: str = "digits"
    path: str | None = None  # .npz file or image folder (train/ + test/ sub-folders, or one folder and data.split)
    hub_id: str | None = None  # Hugging Face dataset id, e.g. uoft-cs/cifar100
    hub_config: str | None = None
    hub_revision: str | None = None  # a Hub commit / tag / branch to pin the dataset to; None: the latest
    image_column: str = "image"
    label_column: str = "label"
    train_split: str = "train"
    test_split: str = "test"
    array_keys: dict[str, str] = field(
        default_factory=lambda: {"train_x": "train_x", "train_y": "train_y", "test_x": "test_x", "test_y": "test_y"}
    )
    # Which images train and which test (slca_kit/data/splits.py): official (the source's own splits) | reference
    # (the SLCA reference's: Cars-196 swapped, ImageNet-R dualprompt) | stratified (test_fraction of each class)
    # | dualprompt (ImageNet-R's random_split of dualprompt-pytorch) | coda (CODA-Prompt's lists, split_lists).
    # None: stratified when test_fraction is set, else official.
    split: str | None = None
    split_lists: list[str] = field(default_factory=list)  # coda: [train list, test list] (CODA-Prompt YAML files)
    test_fraction: float | None = None  # stratified: fraction of each class's images that test
    split_seed: int = 0
    num_classes: int | None = None  # declared class count, checked against the data
    transform: str = "none"  # transform preset: cifar | imagenet_r | cub_cars (SLCA) | pilot | pilot_cifar | none
    # Input size and normalisation. With backbone.source transformers, the ones the recipe leaves unset come from
    # the checkpoint's image processor (None until the run starts; slca_kit/models/hf_backbone.py).
    image_size: int | None = 224
    mean: list[float] | None = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet (slca.md, Backbones)
    std: list[float] | None = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_workers: int = 0
    max_train_per_class: int | None = None  # subsample for quick runs; None keeps everything
    # Unreadable image files: "fail" stops with the file's path when it is first read; "skip" decodes every image
    # once at start, leaves the unreadable ones out and counts them in results.json.
    bad_images: str = "fail"
    # Decode the training images once into one uint8 array and apply the train transform's crop, flip and
    # brightness to whole batches on the accelerator (slca_kit/data/device_augment.py), for benchmarks whose images
    # share one small size (CIFAR-100). Off: the reference's per-image PIL pipeline in the loader.
    augment_on_device: bool = False


@dataclass
class ScenarioConfig:
    init_classes: int | None = None  # B in B{init}-Inc{increment}; None means B0 (first task = increment)
    increment: int = 10
    num_tasks: int | None = None  # if set, must equal the number of tasks the split produces
    # Classes left over after the last full increment: their own smaller task ("separate": Cars-196 = 9 x 20 + 16,
    # slca.md) or added to the last task ("merge": Flowers-102 = 9 x 10 + 12, shared/README.md).
    remainder: str = "separate"
    # Reference class order: np.random.seed(s); np.random.permutation(n); seeds 1993/1996/1997 (slca.md).
    class_order_seed: int | None = 1993


@dataclass
class BackboneConfig:
    # timm: ``name`` is a timm model name. transformers: ``name`` is a Hub id or a local folder saved with
    # save_pretrained (ViT, DINOv2, CLIP / SigLIP vision towers; slca_kit/models/hf_backbone.py).
    source: str = "timm"
    name: str = "vit_base_patch16_224.augreg_in21k"  # SLCA's IN21K backbone (slca.md, Backbones)
    # timm: True downloads from the Hub (needs network); weights= loads a local file instead; unset means false.
    # transformers: the checkpoint's weights load unless this is false (then its config, randomly initialised).
    pretrained: bool | None = None
    revision: str | None = None  # transformers: a Hub commit / tag / branch to pin the checkpoint to
    weights: str | None = None  # timm: local .safetensors / .pth / .npz
    weights_key: str | None = None  # sub-dict of a .pth to load, e.g. "model" for MoCo v3 (slca.md)
    card: str | None = None  # JSON model card with a "config" block of timm kwargs (../shared/weights/*.json)
    # timm: extra timm.create_model kwargs; transformers: overrides of the checkpoint's config (from_pretrained)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    replace_final_norm: bool = True  # reference replaces the final norm with a fresh LayerNorm (slca.md)
    drop_rate: float = 0.0  # reference: dropout / drop-path 0
    drop_path_rate: float = 0.0


@dataclass
class AdapterConfig:
    """A peft adapter on the backbone. Keys not listed here are options of the peft config class (e.g. ``r``,
    ``lora_alpha``, ``lora_dropout`` for LoRA) and may be written inline in the recipe's ``adapter:`` block."""

    type: str | None = None  # a peft type name (lora, dora, ia3, loha, lokr, oft, boft, hra, vera, ...); None: none
    # A string is a regex matched against full module names (peft: re.fullmatch); it never hits
    # patch_embed.proj unless asked (libraries.md: a plain "proj" target would also adapt the Conv2d).
    # Unset: this default on timm ViTs; transformers checkpoints name theirs in the recipe (e.g. [q_proj, v_proj]).
    target_modules: str | list[str] | None = None
    # Backbone parameters that train besides the adapter: names containing any of these (e.g. norm, bias,
    # cls_token); empty: only the adapter (and the heads) train.
    train_backbone: list[str] = field(default_factory=list)
    lr_scale: float = 1.0  # adapter lr = train.lr * lr_scale
    custom_modules: dict[str, str] = field(default_factory=dict)  # "torch.nn.Linear": "my_pkg.MyLoraLayer"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 20  # CIFAR 20, IN-R/CUB/Cars 50, MoCo v3 90 (slca.md, Stage 1)
    batch_size: int = 128  # slca.md, Stage 1
    lr: float = 0.01  # classifier lr; backbone lr = lr * method's backbone_lr_scale (slca.md)
    optimizer: str = "sgd"  # sgd | adam | adamw
    # torch.optim's implementation: default | foreach (one multi-tensor kernel per group) | fused (one fused kernel;
    # CUDA, and CPU with recent torch). The same update up to float rounding (tests/test_fast_path.py).
    optimizer_impl: str = "default"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # multistep | cosine (half cosine to eta_min) | coda_cosine (CODA-Prompt's quarter cosine) | constant; per epoch
    scheduler: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [18])  # CIFAR [18], others [40] (slca.md)
    gamma: float = 0.1
    eta_min: float = 0.0  # cosine floor
    grad_clip: float | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    cpu: bool = False  # run on CPU even when a GPU is present (always on CPU when CUDA is not available)
    seed: int = 1  # reference fixes the torch seed at 1 (slca.md)
    eval_batch_size: int = 256
    checkpoint_every_epoch: bool = False
    keep_checkpoints: int = 2  # older checkpoints are deleted once a newer one is complete
    log_with: list[str] = field(default_factory=list)  # accelerate trackers, e.g. [tensorboard]
    deterministic: bool = True  # torch.use_deterministic_algorithms(warn_only) on CPU
    # When only the head trains in a task (linear_probe, pnn with MLP columns, generative_replay with a frozen
    # backbone, ...), compute the task's features once and train on them (slca_kit/feature_cache.py). Views: 0 = one
    # pass under the TEST transform; V >= 1 = V passes under the training transform, epoch e using view e mod V.
    feature_cache: bool = False
    feature_cache_views: int = 0
    # torch.compile of the backbone, in place (nn.Module.compile, the state dict keeps its keys): null = eager
    # PyTorch; "inductor" = torch's compiler (on CPU it needs a C++ compiler), or any torch.compile backend.
    compile_backend: str | None = None


@dataclass
class MethodConfig:
    name: str = "slca"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TIMM_ADAPTER_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"

CHOICES = {
    "train.optimizer_impl": ("default", "foreach", "fused"),
    "backbone.source": ("timm", "transformers"),
    "data.source": ("digits", "arrays", "imagefolder", "hub"),
    "data.transform": ("cifar", "imagenet_r", "cub_cars", "pilot", "pilot_cifar", "none"),
    "scenario.remainder": ("separate", "merge"),
    "data.bad_images": ("fail", "skip"),
    "train.optimizer": ("sgd", "adam", "adamw"),
    "train.scheduler": ("multistep", "cosine", "coda_cosine", "constant"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints are accepted where floats are expected)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def unknown_key_message(key: str, where: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where or 'recipe'}: unknown key {key!r}{hint}; valid keys: {', '.join(sorted(valid))}"


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types with the key's full path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(unknown_key_message(str(key), where, names))
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class DuplicateKey(ConfigError):
    """A mapping in a YAML text gives the same key twice (PyYAML would silently keep the last value)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys in a mapping, naming the key and both lines, and reads
    ``1e-3`` as a number (YAML 1.2; PyYAML's YAML 1.1 rules make it a string unless written ``1.0e-3``)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' may repeat keys on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise DuplicateKey(f"duplicate key {key!r} on lines {first_line[key]} and {line} "
                                   "(each key may appear once per section)")
            first_line[key] = line
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    """``yaml.safe_load`` that refuses duplicate keys (``DuplicateKey``)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_recipe_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML recipe, resolving ``extends: other.yaml`` (relative to the recipe) recursively."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle through {[str(p) for p in _seen]}")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the recipe: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    parents = data.pop("extends", None)
    if parents is None:
        return data
    merged: dict = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = deep_merge(merged, load_recipe_dict(path.parent / parent, _seen + (path.resolve(),)))
    return deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``train.milestones=[40]`` works)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if "=" not in item or not all(part.strip() for part in parts):
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted KEY, e.g. train.epochs=5")
        try:
            value = parse_yaml(raw)
        except DuplicateKey as err:
            raise ConfigError(f"override {item!r}: {err}") from None
        except yaml.YAMLError:
            value = raw
        parts = [part.strip() for part in parts]
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty section ("train:" alone)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


_ENV_PATTERN = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` so recipes can point at ``${SLCA_SHARED:-../shared}``."""

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(f"environment variable {name} is not set and {match.group(0)} gives no default")
        return default

    return _ENV_PATTERN.sub(replace, text)


PATH_KEYS = (("data", "path"), ("backbone", "weights"), ("backbone", "card"), ("backbone", "name"))  # ${VAR}, ~ expand


def build_config(data: dict) -> Config:
    """A recipe dict whose benchmark preset is already merged (``slca_kit.resolve``) -> a validated ``Config``;
    ``method.params`` stays a mapping, typed by the method layer above this one."""
    data = copy.deepcopy(data)
    for section, key in PATH_KEYS:
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str):
            data[section][key] = os.path.expanduser(expand_env(value))
    if isinstance(data.get("output_dir"), str):
        data["output_dir"] = os.path.expanduser(expand_env(data["output_dir"]))
    if isinstance(data.get("adapter"), dict):  # inline peft options move under adapter.options
        known = {f.name for f in dataclasses.fields(AdapterConfig)}
        adapter = {k: v for k, v in data["adapter"].items() if k in known}
        extra = {k: v for k, v in data["adapter"].items() if k not in known}
        options = adapter.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"adapter.options: expected a mapping of peft options, got {options!r}")
        data["adapter"] = {**adapter, "options": {**options, **extra}}
    cfg = build_dataclass(Config, data, "")
    validate_config(cfg)
    if cfg.backbone.pretrained is None:  # timm: random init unless asked; transformers: the checkpoint's weights
        cfg.backbone.pretrained = cfg.backbone.source == "transformers"
    if cfg.adapter.target_modules is None and cfg.backbone.source == "timm":
        cfg.adapter.target_modules = TIMM_ADAPTER_TARGETS
    return cfg


def _check_positive(value: Any, key: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: must be {bound}, got {value}")


def _validate_backbone(cfg: Config) -> None:
    backbone = cfg.backbone
    if backbone.source == "timm":
        if backbone.revision is not None:
            raise ConfigError("backbone.revision: only for backbone.source transformers (timm names pin their "
                              "weights by tag, e.g. vit_base_patch16_224.augreg_in21k)")
        return
    for key in ("weights", "weights_key", "card"):
        if getattr(backbone, key) is not None:
            raise ConfigError(f"backbone.{key}: timm only; a transformers checkpoint carries its weights and config "
                              "(set backbone.name to its Hub id or local folder)")
    for key, example in (("drop_rate", "hidden_dropout_prob"), ("drop_path_rate", "drop_path_rate")):
        if getattr(backbone, key):
            raise ConfigError(f"backbone.{key}: timm only; set the checkpoint's own config key through "
                              f"backbone.model_kwargs (e.g. {example} for ViT / DINOv2)")
    if cfg.adapter.type and not cfg.adapter.target_modules:
        raise ConfigError("adapter.target_modules: required with backbone.source transformers; name the "
                          "checkpoint's Linear modules, e.g. [q_proj, v_proj] for its attention")


def validate_config(cfg: Config) -> None:
    """Value checks that types alone cannot express. Data-dependent checks happen when the data is loaded."""
    for key, valid in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in valid:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(valid)}")
    for key in ("train.epochs", "scenario.increment"):
        section, name = key.split(".")
        _check_positive(getattr(getattr(cfg, section), name), key, allow_zero=key == "train.epochs")
    for key in ("train.batch_size", "train.eval_batch_size", "train.gradient_accumulation_steps",
                "data.image_size"):
        section, name = key.split(".")
        _check_positive(getattr(getattr(cfg, section), name), key)
    _check_positive(cfg.train.lr, "train.lr")
    _check_positive(cfg.data.max_train_per_class, "data.max_train_per_class")
    for key in ("train.seed", "data.split_seed", "scenario.class_order_seed", "data.num_workers", "train.momentum",
                "train.weight_decay", "train.gamma", "train.eta_min", "train.grad_clip", "train.feature_cache_views",
                "backbone.drop_rate", "backbone.drop_path_rate"):
        section, name = key.split(".")
        _check_positive(getattr(getattr(cfg, section), name), key, allow_zero=True)
    for key in ("train.seed", "data.split_seed", "scenario.class_order_seed"):  # NumPy seeds are 32-bit
        value = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        if value is not None and value >= 2**32:
            raise ConfigError(f"{key}: must be below 2**32, got {value}")
    for key in ("backbone.drop_rate", "backbone.drop_path_rate"):
        if getattr(cfg.backbone, key.split(".")[1]) >= 1:
            raise ConfigError(f"{key}: a probability below 1, got {getattr(cfg.backbone, key.split('.')[1])}")
    _check_positive(cfg.train.keep_checkpoints, "train.keep_checkpoints")
    _check_positive(cfg.scenario.init_classes, "scenario.init_classes")
    _check_positive(cfg.scenario.num_tasks, "scenario.num_tasks")
    splits = ("official", "reference", "stratified", "dualprompt", "coda")
    if cfg.data.split is not None and cfg.data.split not in splits:
        raise ConfigError(f"data.split: {cfg.data.split!r} is not one of {', '.join(splits)}")
    if cfg.data.split == "coda" and len(cfg.data.split_lists) != 2:
        raise ConfigError("data.split_lists: split coda needs [train list, test list], the files "
                          "dataloaders/splits/imagenet-r_{train,test}.yaml of GT-RIPL/CODA-Prompt")
    for listed in cfg.data.split_lists:
        if not Path(listed).is_file():
            raise ConfigError(f"data.split_lists: file not found: {listed}")
    if cfg.data.test_fraction is not None and not 0 < cfg.data.test_fraction < 1:
        raise ConfigError(f"data.test_fraction: must be between 0 and 1, got {cfg.data.test_fraction}")
    for key in ("mean", "std"):
        value = getattr(cfg.data, key)
        if value is not None and len(value) != 3:
            raise ConfigError(f"data.{key}: needs 3 values (RGB), got {value}")
        if cfg.backbone.source == "timm" and value is None:
            raise ConfigError(f"data.{key}: needs 3 values (RGB); only a transformers backbone's image processor "
                              "can fill it in")
    if cfg.backbone.source == "timm" and cfg.data.image_size is None:
        raise ConfigError("data.image_size: needs a size in pixels; only a transformers backbone's image processor "
                          "can fill it in")
    _validate_backbone(cfg)
    if cfg.data.source in ("arrays", "imagefolder") and not cfg.data.path:
        raise ConfigError(f"data.path: required when data.source is {cfg.data.source!r}")
    if cfg.data.source in ("arrays", "imagefolder") and not Path(cfg.data.path).exists():
        raise ConfigError(f"data.path: {cfg.data.path} does not exist")
    if cfg.data.source == "hub" and not cfg.data.hub_id:
        raise ConfigError("data.hub_id: required when data.source is 'hub'")
    for key in ("weights", "card"):
        value = getattr(cfg.backbone, key)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"backbone.{key}: file not found: {value}")
    if cfg.data.augment_on_device and cfg.train.feature_cache:
        raise ConfigError("data.augment_on_device: cannot be combined with train.feature_cache (the cache already "
                          "takes the images out of the loop); set one of them to false")
    if sorted(cfg.train.milestones) != cfg.train.milestones:
        raise ConfigError(f"train.milestones: must be increasing, got {cfg.train.milestones}")
