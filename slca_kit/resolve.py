"""Recipe -> validated ``Config``, one layer above the config module: the benchmark preset named by
``data.benchmark`` (data layer) is merged beneath the recipe, the typed config is built and checked
(``config.build_config``), and ``method.params`` become the method's ``Params`` (methods layer)."""
from __future__ import annotations

import copy
from pathlib import Path

from .config import Config, apply_overrides, build_config, load_recipe_dict
from .data.benchmarks import apply_benchmark_preset
from .methods import validate_method_params


def config_from_dict(data: dict) -> Config:
    cfg = build_config(apply_benchmark_preset(copy.deepcopy(data)))
    cfg.method.params = validate_method_params(cfg.method.name, cfg.method.params)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a recipe file (``extends`` resolved), apply ``key=value`` overrides, and resolve it."""
    data = load_recipe_dict(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))
