"""Recipes shipped inside the package (``slca_kit/recipes/BENCHMARK/METHOD.yaml``), addressable by name:
``slca train cifar100/slca`` works from any folder and from an installed wheel; a path to any YAML file works too."""
from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from .errors import ConfigError

def recipes_root() -> Path:
    return Path(str(resources.files("slca_kit") / "recipes"))


def packaged_recipes() -> list[str]:
    """Names (``benchmark/method``) of every packaged recipe a user runs; ``_base`` files are only extended."""
    root = recipes_root()
    return sorted(str(path.relative_to(root).with_suffix("")) for path in root.rglob("*.yaml")
                  if not path.name.startswith("_") and path.parent != root)


def find_recipe(name_or_path: str) -> Path:
    """An existing file, else the packaged recipe of that name (``.yaml`` optional)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = recipes_root() / (name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path)
    packaged = packaged.with_name(packaged.name + ".yaml")
    if packaged.is_file() and not packaged.name.startswith("_"):
        return packaged
    close = difflib.get_close_matches(name_or_path, packaged_recipes(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `slca list` shows the packaged recipes"
    raise ConfigError(f"recipe {name_or_path!r}: no such file, and no packaged recipe of that name{hint}")
