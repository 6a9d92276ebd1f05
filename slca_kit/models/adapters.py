"""PEFT adapters from a recipe's ``adapter:`` block, injected with ``peft`` into the unmodified backbone (a timm
ViT, or a transformers vision model).

``adapter.type`` is a peft type name (``lora``, ``ia3``, ``vera``, ...; see ``adapter_types``) and picks its
config class; every other key of the block except ``target_modules``,
``train_backbone``, ``lr_scale`` and ``custom_modules`` is passed to that class (and checked against its fields).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any

from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError, first_line

ADAPTER_NAME = "default"


# Defaults slca_kit adds for a tuner on the backbone (a recipe's own options win).
TYPE_PRESETS = {
    "dora": {"use_dora": True},  # an alias: LoRA with DoRA's magnitude vector
    # scales fc2's input; timm's blocks.N.mlp.fc2 and transformers' ViT / DINOv2 / CLIP / SigLIP ...mlp.fc2
    "ia3": {"feedforward_modules": r"(.*\.)?mlp\.fc2"},
}


def adapter_types() -> dict[str, tuple[type, dict]]:
    """Every tuner peft can inject into a model, by its lower-case peft type name, from peft's own registry
    (``PEFT_TYPE_TO_CONFIG_MAPPING`` / ``PEFT_TYPE_TO_TUNER_MAPPING``): the layer-injecting tuners, not prompt
    learning. Plus ``dora``. Whether a tuner fits the ViT (its target layers, options) is peft's to say."""
    from peft import LoraConfig
    from peft.config import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTuner

    types = {}
    for peft_type, config_cls in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
        if tuner is None or not issubclass(tuner, BaseTuner) or issubclass(config_cls, PromptLearningConfig):
            continue
        name = str(getattr(peft_type, "value", peft_type)).lower()
        types[name] = (config_cls, TYPE_PRESETS.get(name, {}))
    types["dora"] = (LoraConfig, TYPE_PRESETS["dora"])
    return types


def custom_module_types() -> list[str]:
    """Adapter types whose peft config accepts custom layers (``_register_custom_module``)."""
    return sorted(name for name, (config_cls, _) in adapter_types().items()
                  if hasattr(config_cls, "_register_custom_module"))



def _import(dotted: str, key: str) -> Any:
    module_name, _, attribute = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{key}: cannot import {dotted!r}: {err}") from None


def build_peft_config(cfg: AdapterConfig):
    types = adapter_types()
    if cfg.type not in types:
        raise ConfigError(f"adapter.type: {cfg.type!r} is not a peft tuner that injects into a model; valid: "
                          f"{', '.join(sorted(types))}")
    config_cls, preset = types[cfg.type]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for key in cfg.options:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"adapter: {config_cls.__name__} has no option {key!r}{hint}")
    try:
        config = config_cls(**{**preset, **cfg.options, "target_modules": cfg.target_modules})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"adapter: invalid {config_cls.__name__} options for {cfg.type!r}: "
                          f"{first_line(err)}") from None
    if cfg.custom_modules:
        if not hasattr(config, "_register_custom_module"):
            raise ConfigError(f"adapter.custom_modules: peft's {config_cls.__name__} ({cfg.type}) takes no custom "
                              f"layers; types that do: {', '.join(custom_module_types())}")
        # peft's hook for adapter layers it does not ship: {base layer class: adapter layer class}
        mapping = {_import(base, "adapter.custom_modules"): _import(layer, "adapter.custom_modules")
                   for base, layer in cfg.custom_modules.items()}
        config._register_custom_module(mapping)
    return config


def attach_adapter(backbone: nn.Module, cfg: AdapterConfig) -> set[str]:
    """Inject the adapter; freeze the backbone except the adapter and the parameters whose names contain one of
    ``train_backbone``. Returns the names of the adapter's parameters."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(build_peft_config(cfg), backbone, adapter_name=ADAPTER_NAME)
    except (ValueError, TypeError, NotImplementedError, KeyError, AttributeError) as err:
        # e.g. no module matched target_modules, or a tuner that cannot be injected on its own
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in backbone.named_modules()
                         if isinstance(module, nn.Linear)})
        raise ConfigError(f"adapter: peft could not inject {cfg.type!r} into the backbone (target_modules "
                          f"{cfg.target_modules!r}): {first_line(err)}; its Linear modules are named "
                          f"{', '.join(linear[:12])}") from None
    # peft keys adapter weights by adapter name ("...qkv.lora_A.default.weight"); wrapped base weights move to
    # "...qkv.base_layer.weight" and stay backbone weights.
    adapter = {name for name, _ in backbone.named_parameters() if ADAPTER_NAME in name.split(".")}
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad_(name in adapter or any(part in name for part in cfg.train_backbone))
    return adapter


def adapter_state_dict(backbone: nn.Module) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(backbone, adapter_name=ADAPTER_NAME)


def load_adapter_state_dict(backbone: nn.Module, state: dict) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(backbone, state, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if ADAPTER_NAME in k]
    if missing or result.unexpected_keys:
        from ..errors import CheckpointError

        raise CheckpointError(f"adapter weights do not match: missing {missing[:5]}, "
                              f"unexpected {list(result.unexpected_keys)[:5]}")
