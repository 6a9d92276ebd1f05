"""Named benchmark presets: a recipe's ``data.benchmark`` fills in source, columns, class count and transforms.

Transforms and normalization follow the SLCA reference (slca.md, "Transforms" and "Backbones"); Hub ids are the
ones seen in public code (libraries.md, datasets). ``data.path`` switches any preset to a local image folder.
"""
from __future__ import annotations

from ..config import deep_merge
from ..errors import ConfigError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

BENCHMARKS: dict[str, dict] = {
    "cifar100": {
        "data": {"source": "hub", "hub_id": "uoft-cs/cifar100", "image_column": "img", "label_column": "fine_label",
                 "num_classes": 100, "transform": "cifar", "image_size": 224,
                 # CIFAR statistics, not ImageNet's (slca.md, Backbones)
                 "mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]},
        "scenario": {"increment": 10},
    },
    "imagenet_r": {
        # One split on the Hub: deterministic per-class 80/20 split made here (slca.md, Task split).
        "data": {"source": "hub", "hub_id": "axiong/imagenet-r", "label_column": "label", "num_classes": 200,
                 "transform": "imagenet_r", "image_size": 224, "test_fraction": 0.2,
                 "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "scenario": {"increment": 20},
    },
    "cub200": {
        "data": {"source": "hub", "hub_id": "bentrevett/caltech-ucsd-birds-200-2011", "num_classes": 200,
                 "transform": "cub_cars", "image_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "scenario": {"increment": 20},
    },
    "cars196": {
        # 9 tasks of 20 and a last task of 16 (slca.md, Task split).
        "data": {"source": "hub", "hub_id": "tanganke/stanford_cars", "num_classes": 196,
                 "transform": "cub_cars", "image_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "scenario": {"increment": 20, "num_tasks": 10},
    },
    "flowers102_proxy": {
        # ../shared/data/flowers102_32.npz: the CPU proxy of split CUB/Cars (shared/README.md).
        "data": {"source": "arrays", "num_classes": 102, "transform": "cub_cars", "image_size": 32,
                 "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "scenario": {"increment": 10},
    },
    "digits": {
        # scikit-learn's 8x8 handwritten digits, shipped inside the package: the offline embedded default.
        "data": {"source": "digits", "num_classes": 10, "transform": "none", "image_size": 32,
                 "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "test_fraction": 0.25},
        "scenario": {"increment": 2},
    },
}


def apply_benchmark_preset(recipe: dict) -> dict:
    """Merge the preset named by ``data.benchmark`` beneath the recipe (the recipe's own keys win)."""
    data = recipe.get("data")
    name = data.get("benchmark") if isinstance(data, dict) else None
    if name is None:
        return recipe
    if name not in BENCHMARKS:
        raise ConfigError(f"data.benchmark: unknown benchmark {name!r}; valid: {', '.join(sorted(BENCHMARKS))}")
    preset = BENCHMARKS[name]
    if data.get("path") and data.get("source") is None and preset["data"]["source"] == "hub":
        # A local copy of a Hub benchmark: an image folder with train/ (and test/) sub-folders.
        preset = deep_merge(preset, {"data": {"source": "imagefolder"}})
    return deep_merge(preset, recipe)
