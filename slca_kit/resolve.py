"""Recipe -> validated ``Config``, one layer above the config module: the benchmark preset named by
``data.benchmark`` (data layer) is merged beneath the recipe, the typed config is built and checked
(``config.build_config``), and ``method.params`` become the method's ``Params`` (methods layer)."""
from __future__ import annotations

import copy
from pathlib import Path

from .config import Config, apply_overrides, build_config, load_recipe_dict
from .data.benchmarks import apply_benchmark_preset
from .errors import ConfigError
from .methods import method_class, validate_method_params


IMAGE_SETTINGS = ("mean", "std", "image_size")


def config_from_dict(data: dict) -> Config:
    recipe_data = data.get("data") if isinstance(data.get("data"), dict) else {}
    cfg = build_config(apply_benchmark_preset(copy.deepcopy(data)))
    if cfg.backbone.source == "transformers":
        # The checkpoint's image processor wins over the benchmark preset; the recipe's own values win over both
        # (filled in when the run starts: slca_kit/models/hf_backbone.py fill_image_settings).
        for key in IMAGE_SETTINGS:
            if key not in recipe_data:
                setattr(cfg.data, key, None)
    cfg.method.params = validate_method_params(cfg.method.name, cfg.method.params)
    sources = method_class(cfg.method.name).backbone_sources(cfg.method.params)
    if cfg.backbone.source not in sources:
        raise ConfigError(f"backbone.source: method {cfg.method.name} supports {' and '.join(sources)} backbones "
                          f"only, not {cfg.backbone.source} (it attaches to timm's ViT blocks)")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a recipe file (``extends`` resolved), apply ``key=value`` overrides, and resolve it."""
    data = load_recipe_dict(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))
