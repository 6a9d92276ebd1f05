"""Image sources: scikit-learn digits (embedded), ``.npz`` arrays, local image folders and Hugging Face datasets.

Every source becomes two ``ImageSplit`` objects (train, test) that expose integer labels and decode one image at a
time, so large Hub datasets are never materialised in memory.
"""
from __future__ import annotations

import abc
import io
import zipfile
import zlib

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..config import DataConfig
from ..errors import DataError, UnreadableImage
from .scenario import Scenario
from .splits import dualprompt_split, fingerprint, listed_split, resolved_split, stratified_split


def integer_labels(labels: Any, name: str) -> np.ndarray:
    """Labels as int64, refusing what a cast would silently change: fractional or non-finite floats, and values
    that are not numbers. Whole-number floats (1.0, 2.0) are accepted."""
    values = np.asarray(labels)
    if values.ndim != 1:
        raise DataError(f"{name}: labels must be one integer per image, got an array of shape {values.shape}")
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind != "f":
        raise DataError(f"{name}: labels must be integers, got {values.dtype} values")
    bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
    if len(bad):
        raise DataError(f"{name}: labels must be whole numbers (class ids 0..K-1), found {values[bad[0]].item()!r} at "
                        f"position {bad[0]} ({len(bad)} such labels)")
    return values.astype(np.int64)


class ImageSplit(abc.ABC):
    """One split: ``labels`` (int64 array) and ``image(i)`` -> RGB PIL image."""

    def __init__(self, labels: np.ndarray, name: str):
        self.labels = integer_labels(labels, name)
        self.name = name

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def image(self, index: int) -> Image.Image:
        """Decode image ``index`` as RGB."""

    def sample_ids(self) -> list[str]:
        """A name per image that identifies it across runs ("class-folder/file" where files have paths)."""
        return [f"#{index:08d}" for index in range(len(self))]


class ArraySplit(ImageSplit):
    """uint8 images [N, H, W] or [N, H, W, C] held in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str):
        super().__init__(labels, name)
        if images.dtype != np.uint8:
            raise DataError(f"{name}: images must be uint8, got {images.dtype}")
        if images.ndim not in (3, 4) or len(images) != len(labels):
            raise DataError(f"{name}: expected images [N,H,W(,C)] matching {len(labels)} labels, got {images.shape}")
        self.images = images

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")


class HubSplit(ImageSplit):
    """A ``datasets.Dataset`` with an image column and an integer label column, decoded lazily here (not by
    ``datasets``) so that an unreadable file is reported with its path."""

    def __init__(self, dataset: Any, image_column: str, labels: np.ndarray, name: str):
        from datasets import Image as ImageFeature

        if image_column not in dataset.column_names:
            raise DataError(f"{name}: no column {image_column!r}; columns are {dataset.column_names} "
                            "(set data.image_column)")
        super().__init__(labels, name)
        if isinstance(dataset.features[image_column], ImageFeature):
            dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        self.dataset = dataset
        self.image_column = image_column
        # Files stored by path alone (the imagefolder builder's rows): the paths are read once, so that an image is
        # opened without formatting its dataset row (benchmarks/data_pipeline.py: "read the row")
        paths, stored_bytes = self._arrow_field("path"), self._arrow_field("bytes")
        path_only = (paths is not None and stored_bytes is not None and not paths.null_count
                     and stored_bytes.null_count == len(stored_bytes))
        self._paths = self._in_view_order(paths.to_pylist()) if path_only else None

    def image(self, index: int) -> Image.Image:
        if self._paths is not None:
            path = self._paths[int(index)]
            return self._open(path, None, path)
        value = self.dataset[int(index)][self.image_column]
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        return self._open(value.get("path"), value.get("bytes"), value.get("path") or f"{self.name}[{index}]")

    def _open(self, path: str | None, data: bytes | None, source: str) -> Image.Image:
        try:
            return (Image.open(io.BytesIO(data)) if data else Image.open(path)).convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise UnreadableImage(self.name, source, str(err)) from None

    def _arrow_field(self, field: str) -> Any:
        """The image column's struct field ``field`` for every stored row (read from Arrow without the other
        fields); None when the column is not a struct with it."""
        import pyarrow.compute as pc

        try:
            return pc.struct_field(self.dataset.data.column(self.image_column), field)
        except (TypeError, ValueError, KeyError, NotImplementedError):
            return None

    def _in_view_order(self, values: list) -> list:
        """Per-stored-row ``values`` in the order of this dataset's rows (a selected / shuffled view maps them)."""
        if self.dataset._indices is None:
            return values
        return [values[row] for row in self.dataset._indices.column(0).to_pylist()]

    def sample_ids(self) -> list[str]:
        """"class-folder/file" from the stored paths (read from Arrow without the image bytes); row numbers when
        the dataset stores no paths."""
        paths = self._arrow_field("path")
        if paths is None:
            return super().sample_ids()
        return ["/".join(path.replace("\\", "/").split("/")[-2:]) if path else f"#{row:08d}"
                for row, path in enumerate(self._in_view_order(paths.to_pylist()))]


class ConcatSplit(ImageSplit):
    """Two splits as one (train then test), to be divided again by a named split."""

    def __init__(self, first: ImageSplit, second: ImageSplit):
        super().__init__(np.concatenate([first.labels, second.labels]), first.name)
        self.parts = (first, second)

    def image(self, index: int) -> Image.Image:
        first, second = self.parts
        return first.image(index) if index < len(first) else second.image(index - len(first))

    def sample_ids(self) -> list[str]:
        return self.parts[0].sample_ids() + self.parts[1].sample_ids()


class SubsetSplit(ImageSplit):
    """A view of another split restricted to ``indices`` (used for made-up test splits and subsampling)."""

    def __init__(self, parent: ImageSplit, indices: np.ndarray, name: str):
        super().__init__(parent.labels[indices], name)
        self.parent = parent
        self.indices = np.asarray(indices)

    def image(self, index: int) -> Image.Image:
        return self.parent.image(int(self.indices[index]))

    def sample_ids(self) -> list[str]:
        ids = self.parent.sample_ids()
        return [ids[int(index)] for index in self.indices]


@dataclass
class LoadedData:
    train: ImageSplit
    test: ImageSplit | None  # None: the source has one split, to be divided by ``data.split``
    class_names: list[str]
    skipped: list[dict] = field(default_factory=list)  # unreadable images left out (data.bad_images: skip)
    split: dict = field(default_factory=dict)  # which split was made, sizes and the test set's fingerprint

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _load_digits(cfg: DataConfig) -> LoadedData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # pixel values are 0..16
    return LoadedData(ArraySplit(images, digits.target, "digits"), None, [str(name) for name in digits.target_names])


def _load_arrays(cfg: DataConfig) -> LoadedData:
    path = Path(cfg.path)
    keys = cfg.array_keys
    if not zipfile.is_zipfile(path):
        raise DataError(f"data.path: {path} is not a complete .npz file (the zip archive np.savez writes; "
                        "truncated?)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [key for key in keys.values() if key not in arrays.files]
            if missing:
                raise DataError(f"data.path: {path} has no arrays {missing}; it has {arrays.files} "
                                "(set data.array_keys)")
            loaded = {name: arrays[key] for name, key in keys.items()}
            classes = arrays["classes"] if "classes" in arrays.files else None
    # a truncated or foreign file fails in zipfile, zlib or NumPy's header parser, each with its own type
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"data.path: cannot read {path} as .npz: {err}") from None
    train = ArraySplit(loaded["train_x"], loaded["train_y"], f"{path.name}/train")
    test = ArraySplit(loaded["test_x"], loaded["test_y"], f"{path.name}/test")
    n = max((int(split.labels.max()) for split in (train, test) if len(split)), default=-1) + 1
    names = [str(c) for c in classes] if classes is not None else [str(i) for i in range(n)]
    return LoadedData(train, test, names)


def _hub_splits(cfg: DataConfig, dataset_dict: Any, origin: str) -> LoadedData:
    """The train split and, when the dataset has it, the test split. Integer labels (a ClassLabel's names when
    declared) are used as they are; string labels (ImageNet-R's ``wnid`` on the Hub) become indices into their
    sorted set, the order torchvision's ImageFolder gives class folders."""
    from datasets import ClassLabel

    if cfg.train_split not in dataset_dict:
        raise DataError(f"{origin}: no split {cfg.train_split!r}; splits are {list(dataset_dict)} (data.train_split)")
    parts = {"train": dataset_dict[cfg.train_split]}
    if cfg.test_split in dataset_dict and cfg.test_split != cfg.train_split:
        parts["test"] = dataset_dict[cfg.test_split]
    for part in parts.values():
        if cfg.label_column not in part.column_names:
            raise DataError(f"{origin}: no column {cfg.label_column!r}; columns are {part.column_names} "
                            "(set data.label_column)")
    raw = {key: np.asarray(part[cfg.label_column]) for key, part in parts.items()}
    feature = parts["train"].features.get(cfg.label_column)
    if any(values.dtype.kind in "UO" for values in raw.values()):
        names = sorted({str(value) for values in raw.values() for value in values})
        index = {name: position for position, name in enumerate(names)}
        labels = {key: np.asarray([index[str(value)] for value in values], dtype=np.int64)
                  for key, values in raw.items()}
    else:
        labels = raw
        top = max((int(values.max()) for values in raw.values() if len(values)), default=-1)
        names = list(feature.names) if isinstance(feature, ClassLabel) else [str(i) for i in range(top + 1)]
    splits = {key: HubSplit(part, cfg.image_column, labels[key],
                            f"{origin}/{cfg.train_split if key == 'train' else cfg.test_split}")
              for key, part in parts.items()}
    return LoadedData(splits["train"], splits.get("test"), names)


def _load_imagefolder(cfg: DataConfig) -> LoadedData:
    from datasets import load_dataset

    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder of class sub-folders")
    has_splits = (root / cfg.train_split).is_dir()
    if has_splits:
        data_files = {split: str(root / split / "**") for split in (cfg.train_split, cfg.test_split)
                      if (root / split).is_dir()}
        dataset_dict = load_dataset("imagefolder", data_files=data_files)
    else:
        dataset_dict = load_dataset("imagefolder", data_files={cfg.train_split: str(root / "**")})
    image_cfg = DataConfig(**{**cfg.__dict__, "image_column": "image", "label_column": "label"})
    return _hub_splits(image_cfg, dataset_dict, str(root))


def _load_hub(cfg: DataConfig) -> LoadedData:  # pragma: no cover - needs network; exercised on real machines
    from datasets import load_dataset

    dataset_dict = load_dataset(cfg.hub_id, cfg.hub_config, revision=cfg.hub_revision)
    return _hub_splits(cfg, dataset_dict, cfg.hub_id)


LOADERS = {"digits": _load_digits, "arrays": _load_arrays, "imagefolder": _load_imagefolder, "hub": _load_hub}


def apply_split(cfg: DataConfig, data: LoadedData) -> LoadedData:
    """Make the train/test split ``data.split`` names (see ``splits``) and record it with a fingerprint."""
    name = resolved_split(cfg)
    if name in ("official", "swapped"):
        if data.test is None:
            raise DataError(f"{data.train.name}: the source has one split; set data.split to stratified (with "
                            "data.test_fraction), dualprompt or coda, or give train/ and test/ sub-folders")
        if name == "swapped":  # the SLCA reference's Cars split (split_car.py)
            data.train, data.test = data.test, data.train
    else:
        # stratified divides the training images (a test split, if any, is not used); the named splits divide
        # every image the source has
        whole = data.train if data.test is None or name == "stratified" else ConcatSplit(data.train, data.test)
        if name == "stratified":
            train_idx, test_idx = stratified_split(whole.labels, cfg.test_fraction or 0.25, cfg.split_seed)
        else:
            ids = [sample_id if "/" in sample_id else f"{data.class_names[label]}/{sample_id}"
                   for sample_id, label in zip(whole.sample_ids(), whole.labels)]
            if name == "dualprompt":
                train_idx, test_idx = dualprompt_split(ids, whole.labels, data.class_names)
            else:
                train_idx, test_idx = listed_split(ids, cfg.split_lists)
        base = whole.name if data.test is None else whole.name.rsplit("/", 1)[0]  # "origin/train" -> "origin"
        data.train = SubsetSplit(whole, train_idx, f"{base}/train")
        data.test = SubsetSplit(whole, test_idx, f"{base}/test")
    data.split = {"split": name, "train": len(data.train), "test": len(data.test),
                  "test_fingerprint": fingerprint(data.test.sample_ids(), data.test.labels)}
    return data


def check_images_per_class(data: LoadedData, scenario: Scenario, needed: int, why: str) -> None:
    """Before any work: every class has at least ``needed`` training images (``why`` says which method step
    needs them) and every task of ``scenario`` has test images to measure."""
    counts = np.bincount(data.train.labels, minlength=data.num_classes)
    short = np.flatnonzero(counts < needed)
    if len(short):
        label = int(short[0])
        raise DataError(f"{data.train.name}: class {data.class_names[label]!r} (label {label}) has {counts[label]} "
                        f"training image(s), {why} needs at least {needed} per class"
                        + (f" ({len(short)} classes short)" if len(short) > 1 else ""))
    tests = np.bincount(data.test.labels, minlength=data.num_classes)
    for task in range(scenario.num_tasks):
        originals = [scenario.class_order[c] for c in scenario.task_classes(task)]
        if tests[originals].sum() == 0:
            raise DataError(f"{data.test.name}: task {task} (classes {[data.class_names[c] for c in originals][:5]}) "
                            "has no test images, so its accuracy is undefined")


def _subsample(split: ImageSplit, per_class: int, seed: int) -> ImageSplit:
    rng = np.random.RandomState(seed)
    keep = []
    for label in np.unique(split.labels):
        members = np.flatnonzero(split.labels == label)
        keep.append(np.sort(members[rng.permutation(len(members))[:per_class]]))
    return SubsetSplit(split, np.sort(np.concatenate(keep)), split.name)


def drop_unreadable(split: ImageSplit) -> tuple[ImageSplit, list[dict]]:
    """Decode every image once; return the split without the unreadable ones, and those as {file, error}."""
    keep, bad = [], []
    for index in range(len(split)):
        try:
            split.image(index)
            keep.append(index)
        except UnreadableImage as err:
            bad.append({"file": err.source, "error": err.reason})
    if not bad:
        return split, []
    return SubsetSplit(split, np.asarray(keep, dtype=np.int64), split.name), bad


def load_data(cfg: DataConfig) -> LoadedData:
    """Load train/test splits and check labels against ``data.num_classes``."""
    data = LOADERS[cfg.source](cfg)
    for split in (data.train, data.test):
        if split is not None and len(split) == 0:
            raise DataError(f"{split.name}: the split has no images")
    data = apply_split(cfg, data)
    if cfg.bad_images == "skip" and cfg.source != "arrays":  # arrays are always decodable
        data.train, bad_train = drop_unreadable(data.train)
        data.test, bad_test = drop_unreadable(data.test)
        data.skipped = bad_train + bad_test
    for split in (data.train, data.test):
        if len(split) == 0:
            raise DataError(f"{split.name}: the split has no images (data.split / data.bad_images left none)")
        if split.labels.min() < 0:
            raise DataError(f"{split.name}: labels must be >= 0, found {split.labels.min()}")
    present = np.unique(data.train.labels)
    n_classes = cfg.num_classes if cfg.num_classes is not None else data.num_classes
    if cfg.num_classes is not None and data.num_classes != cfg.num_classes:
        raise DataError(f"data.num_classes: recipe declares {cfg.num_classes} but the data has {data.num_classes} "
                        f"classes ({data.train.name})")
    if len(present) != n_classes or present.max() != n_classes - 1:
        missing = sorted(set(range(n_classes)) - set(present.tolist()))[:10]
        raise DataError(f"{data.train.name}: expected labels 0..{n_classes - 1}, classes without training "
                        f"images: {missing}")
    if len(set(data.class_names)) != len(data.class_names):
        raise DataError(f"{data.train.name}: duplicate class names")
    if data.test.labels.max() >= n_classes:
        raise DataError(f"{data.test.name}: label {data.test.labels.max()} >= {n_classes} classes")
    if cfg.max_train_per_class is not None:
        data.train = _subsample(data.train, cfg.max_train_per_class, cfg.split_seed)
    return data
