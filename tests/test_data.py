import numpy as np
import pytest
import torch
from PIL import Image

from slca_kit.config import DataConfig
from slca_kit.data.sources import load_data
from slca_kit.data.splits import stratified_split
from slca_kit.data.task_data import EpochShuffleSampler, TaskDataset
from slca_kit.data.transforms import build_transforms
from slca_kit.errors import DataError

from conftest import make_color_images


def test_arrays_source(tiny_npz):
    data = load_data(DataConfig(source="arrays", path=str(tiny_npz), num_classes=6))
    assert len(data.train) == 96 and len(data.test) == 36
    assert data.class_names[0] == "class_0"
    assert data.train.image(0).mode == "RGB" and data.train.image(0).size == (32, 32)


def test_digits_is_embedded_and_split_per_class():
    data = load_data(DataConfig(source="digits", test_fraction=0.25, num_classes=10))
    assert len(data.train) + len(data.test) == 1797
    for label in range(10):
        n_train, n_test = (data.train.labels == label).sum(), (data.test.labels == label).sum()
        assert n_test == round(0.25 * (n_train + n_test))


def test_stratified_split_is_deterministic_and_disjoint():
    labels = np.repeat(np.arange(4), 10)
    train_a, test_a = stratified_split(labels, 0.2, seed=0)
    train_b, test_b = stratified_split(labels, 0.2, seed=0)
    assert (train_a == train_b).all() and (test_a == test_b).all()
    assert set(train_a).isdisjoint(test_a) and len(train_a) + len(test_a) == 40
    assert np.bincount(labels[test_a]).tolist() == [2, 2, 2, 2]
    assert not (stratified_split(labels, 0.2, seed=1)[1] == test_a).all()


def _image_folder(root, splits=("train", "test")):
    x, y = make_color_images(3, 4, seed=0, size=16)
    for split in splits:
        for i, (image, label) in enumerate(zip(x, y)):
            folder = root / split / f"kind_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")


def test_imagefolder_with_train_and_test(tmp_path):
    _image_folder(tmp_path)
    data = load_data(DataConfig(source="imagefolder", path=str(tmp_path), num_classes=3))
    assert data.class_names == ["kind_0", "kind_1", "kind_2"]
    assert len(data.train) == 12 and len(data.test) == 12
    assert data.train.image(0).size == (16, 16)


def test_imagefolder_images_are_opened_by_their_stored_paths_in_the_view_order(tmp_path):
    """Path-only rows (the imagefolder builder's) are opened from the paths read once; a shuffled and selected view
    maps them; rows that hold the bytes still go through the dataset. Each image equals the file it names."""
    import io

    from datasets import Image as ImageFeature

    from slca_kit.data.sources import HubSplit

    _image_folder(tmp_path)
    data = load_data(DataConfig(source="imagefolder", path=str(tmp_path), num_classes=3))
    assert data.train._paths is not None
    view = data.train.dataset.shuffle(seed=3).select([5, 0, 7, 2])
    split = HubSplit(view, "image", np.zeros(4, dtype=np.int64), "view")
    rows = [view[i]["image"] for i in range(4)]
    assert split._paths == [row["path"] for row in rows]
    for index, row in enumerate(rows):
        assert np.array_equal(np.asarray(split.image(index)), np.asarray(Image.open(row["path"]).convert("RGB")))
    stored = view.cast_column("image", ImageFeature(decode=False)).map(
        lambda row: {"image": {"bytes": open(row["image"]["path"], "rb").read(), "path": None}})
    with_bytes = HubSplit(stored, "image", np.zeros(4, dtype=np.int64), "bytes")
    assert with_bytes._paths is None
    for index, row in enumerate(rows):
        expected = Image.open(io.BytesIO(stored[index]["image"]["bytes"])).convert("RGB")
        assert np.array_equal(np.asarray(with_bytes.image(index)), np.asarray(expected))
        assert np.array_equal(np.asarray(with_bytes.image(index)), np.asarray(split.image(index)))


def test_imagefolder_single_split_needs_test_fraction(tmp_path):
    _image_folder(tmp_path, splits=("all",))
    root = tmp_path / "all"
    with pytest.raises(DataError, match="data.test_fraction"):
        load_data(DataConfig(source="imagefolder", path=str(root)))
    data = load_data(DataConfig(source="imagefolder", path=str(root), test_fraction=0.25))
    assert len(data.train) == 9 and len(data.test) == 3


def test_task_dataset_remaps_labels(tiny_npz):
    data = load_data(DataConfig(source="arrays", path=str(tiny_npz)))
    label_map = np.array([3, 0, 1, 2, 5, 4])  # original label -> position in class order
    _, test_tf = build_transforms(DataConfig(image_size=32, transform="none"))
    dataset = TaskDataset(data.test, label_map, [0, 1], test_tf)
    originals = data.test.labels[dataset.indices]
    assert set(originals.tolist()) == {1, 2}
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and label == label_map[originals[0]]


@pytest.mark.parametrize("preset", ["cifar", "imagenet_r", "cub_cars", "none"])
def test_transforms_produce_image_size(preset):
    train, test = build_transforms(DataConfig(image_size=32, transform=preset))
    image = Image.fromarray(np.zeros((40, 50, 3), np.uint8))
    assert train(image).shape == (3, 32, 32) and test(image).shape == (3, 32, 32)


@pytest.mark.parametrize("preset", ["cifar", "imagenet_r", "cub_cars"])
def test_test_resize_is_bicubic_on_every_benchmark(preset):
    """GengDavid/SLCA utils/data.py: Resize(256, interpolation=3) for CIFAR, ImageNet-R, CUB and Cars."""
    from torchvision.transforms import InterpolationMode

    _, test = build_transforms(DataConfig(image_size=224, transform=preset))
    resize = test.transforms[0]
    assert resize.size == 256 and resize.interpolation == InterpolationMode.BICUBIC


def test_epoch_sampler_is_reproducible():
    sampler = EpochShuffleSampler(10, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(3)
    other = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == first and sorted(first) == list(range(10)) and other != first
    assert torch.randperm(10, generator=torch.Generator().manual_seed(3 * 10_007 + 2)).tolist() == first


def test_augmentation_is_seeded_per_image_and_epoch(tiny_npz):
    data = load_data(DataConfig(source="arrays", path=str(tiny_npz)))
    train_tf, _ = build_transforms(DataConfig(image_size=32, transform="cifar"))
    label_map = np.arange(6)
    dataset = TaskDataset(data.train, label_map, [0, 1, 2], train_tf, augment_seed=7)
    first = dataset[5][0]
    torch.manual_seed(123)  # the global RNG does not matter ...
    assert torch.equal(dataset[5][0], first)
    state = torch.get_rng_state()
    dataset[3]
    assert torch.equal(torch.get_rng_state(), state)  # ... and is not consumed
    # the same image in a dataset of other classes (a joint run, another shard) gets the same augmentation
    wider = TaskDataset(data.train, label_map, [0, 1, 2, 3, 4, 5], train_tf, augment_seed=7)
    assert torch.equal(wider[5][0], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[5][0], first)
    # the draws are torchvision's from the CPU generator seeded with the image's seed: what torch.manual_seed gave
    dataset.set_epoch(0)
    index = int(dataset.indices[5])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(((7 * 1_000_003 + 0) * 100_003 + index) % 2**63)
        assert torch.equal(train_tf(data.train.image(index)), first)
