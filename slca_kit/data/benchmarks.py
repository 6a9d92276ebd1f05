"""Named benchmark presets: a recipe's ``data.benchmark`` fills in source, columns, class count and transforms.

Transforms and normalization follow the SLCA reference (slca.md, "Transforms" and "Backbones"); Hub ids are the
ones seen in public code (libraries.md, datasets). ``data.path`` switches any preset to a local image folder.
"""
from __future__ import annotations

from ..config import deep_merge
from ..errors import ConfigError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# "hub" holds what only the Hub source needs; a recipe with data.path (a local image folder) does not get it.
BENCHMARKS: dict[str, dict] = {
    "cifar100": {
        "data": {"num_classes": 100, "transform": "cifar", "image_size": 224,
                 # CIFAR statistics, not ImageNet's (GengDavid/SLCA utils/data.py iCIFAR100_224)
                 "mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]},
        # fine_label ids = torchvision CIFAR100's targets, the reference's labels
        "hub": {"source": "hub", "hub_id": "uoft-cs/cifar100", "image_column": "img", "label_column": "fine_label"},
        "scenario": {"increment": 10},
    },
    "imagenet_r": {
        # One set of 30,000 images; the reference's split is dualprompt-pytorch's random 24,000 / 6,000
        # (slca_kit/data/splits.py). Labels: sorted wnids, the reference's ImageFolder order.
        "data": {"num_classes": 200, "transform": "imagenet_r", "image_size": 224, "split": "dualprompt",
                 "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        # axiong/imagenet-r: one split named "test" with image, wnid, class_name columns
        "hub": {"source": "hub", "hub_id": "axiong/imagenet-r", "train_split": "test", "label_column": "wnid"},
        "scenario": {"increment": 20},
    },
    "cub200": {
        # official train_test_split.txt; labels = official id - 1 = sorted "NNN.Name" folders (split_cub.py)
        "data": {"num_classes": 200, "transform": "cub_cars", "image_size": 224,
                 "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "hub": {"source": "hub", "hub_id": "bentrevett/caltech-ucsd-birds-200-2011"},
        "scenario": {"increment": 20},
    },
    "cars196": {
        # 9 tasks of 20 and a last task of 16. split "reference": train on the official test set, test on the
        # official train set, as GengDavid/SLCA split_car.py does, so numbers sit next to SLCA's Table 1;
        # "official" is the usual split. Labels: official ids (see docs/datasets.md on the class-id order).
        "data": {"num_classes": 196, "transform": "cub_cars", "image_size": 224, "split": "reference",
                 "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "hub": {"source": "hub", "hub_id": "tanganke/stanford_cars"},
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
    if not isinstance(name, str) or name not in BENCHMARKS:
        raise ConfigError(f"data.benchmark: unknown benchmark {name!r}; valid: {', '.join(sorted(BENCHMARKS))}")
    preset = {key: value for key, value in BENCHMARKS[name].items() if key != "hub"}
    if "hub" in BENCHMARKS[name]:
        local = data.get("path") and data.get("source") in (None, "imagefolder")
        # A local copy of a Hub benchmark is an image folder (train/ and test/ sub-folders, or one folder to split)
        extra = {"source": "imagefolder"} if local else BENCHMARKS[name]["hub"]
        preset = deep_merge(preset, {"data": extra})
    return deep_merge(preset, recipe)
