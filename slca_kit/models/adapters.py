"""PEFT adapters from a recipe's ``adapter:`` block, injected into the unmodified timm ViT with ``peft``.

``adapter.type`` picks the peft config class; every other key of the block except ``target_modules``,
``train_backbone``, ``lr_scale`` and ``custom_modules`` is passed to that class (and checked against its fields).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any

from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError

ADAPTER_NAME = "default"


def _adapter_types() -> dict[str, tuple[type, dict]]:
    import peft

    return {
        "lora": (peft.LoraConfig, {}),
        "dora": (peft.LoraConfig, {"use_dora": True}),
        "ia3": (peft.IA3Config, {"feedforward_modules": r"blocks\.\d+\.mlp\.fc2"}),  # scales fc2's input
        "loha": (peft.LoHaConfig, {}),
        "lokr": (peft.LoKrConfig, {}),
        "oft": (peft.OFTConfig, {}),
        "boft": (peft.BOFTConfig, {}),
        "hra": (peft.HRAConfig, {}),
    }  # VeRA keeps shared state on peft's tuner, which inject_adapter_in_model does not support


def _import(dotted: str, key: str) -> Any:
    module_name, _, attribute = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{key}: cannot import {dotted!r}: {err}") from None


def build_peft_config(cfg: AdapterConfig):
    types = _adapter_types()
    if cfg.type not in types:
        raise ConfigError(f"adapter.type: {cfg.type!r} is not one of {', '.join(sorted(types))}")
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
        raise ConfigError(f"adapter: invalid {config_cls.__name__} options: {err}") from None
    if cfg.custom_modules:
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
    except ValueError as err:  # e.g. no module matched target_modules
        raise ConfigError(f"adapter.target_modules: {err}") from None
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
