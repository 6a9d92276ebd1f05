"""Datasets as the reference sees them: ImageFolder label ids, the dualprompt-pytorch ImageNet-R split reproduced
exactly, CODA-Prompt's lists, Cars' swapped split, string labels from the Hub, and the split's fingerprint."""
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from slca_kit.config import DataConfig, ScenarioConfig
from slca_kit.resolve import config_from_dict
from slca_kit.data import build_scenario
from slca_kit.data.sources import _hub_splits, apply_split, load_data
from slca_kit.errors import ConfigError, DataError

from conftest import make_color_images

# wnid-like class folders, created in an order that is not the sorted one
WNIDS = ["n04", "n01", "n05", "n03", "n02", "n06"]


def _imagenet_r_like(root):
    """One folder of class sub-folders (like the original imagenet-r.tar), 5 to 7 images per class."""
    x, _ = make_color_images(1, 40, seed=0, size=16)
    files = []
    for k, wnid in enumerate(WNIDS):
        folder = root / wnid
        folder.mkdir(parents=True)
        for i in range(5 + k % 3):
            name = f"{['sketch', 'art', 'toy'][i % 3]}_{i}.png"
            Image.fromarray(x[(k * 7 + i) % 40]).save(folder / name)
            files.append(f"{wnid}/{name}")
    return files


def test_dualprompt_split_is_the_reference_random_split(tmp_path):
    files = _imagenet_r_like(tmp_path)
    data = load_data(DataConfig(source="imagefolder", path=str(tmp_path), split="dualprompt", num_classes=6))
    # dualprompt-pytorch: ImageFolder order (sorted classes, sorted files), global torch.manual_seed(42), then
    # random_split(dataset, [int(0.8 N), N - int(0.8 N)]) = randperm(N) cut at int(0.8 N)
    canonical = sorted(files)
    torch.manual_seed(42)
    permutation = torch.randperm(len(canonical)).tolist()
    n_train = int(0.8 * len(canonical))
    expected_train = sorted(canonical[i] for i in permutation[:n_train])
    expected_test = sorted(canonical[i] for i in permutation[n_train:])
    assert data.train.sample_ids() == expected_train and data.test.sample_ids() == expected_test
    assert data.class_names == sorted(WNIDS)  # label = index in the sorted wnid list, as ImageFolder
    assert [data.class_names[label] for label in data.test.labels] == [i.split("/")[0] for i in expected_test]
    assert data.split["split"] == "dualprompt" and data.split["test"] == len(expected_test)


def test_seed_1993_puts_the_reference_classes_in_the_first_task(tmp_path):
    _imagenet_r_like(tmp_path)
    data = load_data(DataConfig(source="imagefolder", path=str(tmp_path), split="dualprompt", num_classes=6))
    scenario = build_scenario(ScenarioConfig(increment=2, class_order_seed=1993), data.num_classes)
    np.random.seed(1993)  # the reference: np.random.seed(seed); order = np.random.permutation(n) of ImageFolder ids
    order = np.random.permutation(6)
    reference_first_task = [sorted(WNIDS)[i] for i in order[:2]]
    assert [data.class_names[c] for c in scenario.class_order[:2]] == reference_first_task


def test_coda_lists_and_the_fingerprint(tmp_path):
    files = _imagenet_r_like(tmp_path / "images")
    lists = []
    for name, part in (("train", files[::2]), ("test", files[1::2])):
        path = tmp_path / f"imagenet-r_{name}.yaml"
        path.write_text(yaml.safe_dump({"data": [f"data/imagenet-r/{f}" for f in part],
                                        "targets": [0] * len(part)}))
        lists.append(str(path))
    cfg = DataConfig(source="imagefolder", path=str(tmp_path / "images"), split="coda", split_lists=lists)
    data = load_data(cfg)
    assert data.train.sample_ids() == files[::2] and data.test.sample_ids() == files[1::2]
    again = load_data(cfg)
    assert again.split["test_fingerprint"] == data.split["test_fingerprint"]
    other = load_data(DataConfig(source="imagefolder", path=str(tmp_path / "images"), split="dualprompt"))
    assert other.split["test_fingerprint"] != data.split["test_fingerprint"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"data": ["data/imagenet-r/n09/missing.png"]}))
    with pytest.raises(DataError, match="not in the data"):
        load_data(DataConfig(source="imagefolder", path=str(tmp_path / "images"), split="coda",
                             split_lists=[str(tmp_path / "bad.yaml"), lists[1]]))


def test_coda_split_needs_its_two_lists(tiny_npz, tmp_path):
    recipe = {"data": {"source": "arrays", "path": str(tiny_npz), "split": "coda"}}
    with pytest.raises(ConfigError, match="data.split_lists"):
        config_from_dict(recipe)
    with pytest.raises(ConfigError, match="data.split: 'random' is not one of"):
        config_from_dict({"data": {"source": "arrays", "path": str(tiny_npz), "split": "random"}})


def test_cars_reference_split_trains_on_the_official_test_set(tiny_npz):
    recipe = {"data": {"benchmark": "cars196", "source": "arrays", "path": str(tiny_npz), "num_classes": 6,
                       "image_size": 32}}
    cfg = config_from_dict(recipe)
    assert cfg.data.split == "reference"
    data = load_data(cfg.data)
    assert (len(data.train), len(data.test)) == (36, 96) and data.split["split"] == "swapped"
    cfg.data.split = "official"
    assert (len(load_data(cfg.data).train), len(load_data(cfg.data).test)) == (96, 36)


def test_imagenet_r_preset_reads_the_hub_dataset_or_a_local_archive(tmp_path):
    hub = config_from_dict({"data": {"benchmark": "imagenet_r"}}).data
    assert (hub.source, hub.hub_id, hub.train_split, hub.label_column, hub.split) == (
        "hub", "axiong/imagenet-r", "test", "wnid", "dualprompt")
    local = config_from_dict({"data": {"benchmark": "imagenet_r", "path": str(tmp_path)}}).data
    assert (local.source, local.train_split, local.label_column) == ("imagefolder", "train", "label")


def test_string_labels_from_the_hub_become_sorted_ids(tmp_path):
    """axiong/imagenet-r's shape: one split 'test', string wnids, images with paths."""
    from datasets import Dataset, DatasetDict
    from datasets import Image as ImageFeature

    files = _imagenet_r_like(tmp_path)
    dataset = Dataset.from_dict({"image": [str(tmp_path / f) for f in files],
                                 "wnid": [f.split("/")[0] for f in files]}).cast_column("image", ImageFeature())
    cfg = DataConfig(source="hub", hub_id="x", train_split="test", label_column="wnid", split="dualprompt")
    data = apply_split(cfg, _hub_splits(cfg, DatasetDict({"test": dataset}), "x"))
    local = load_data(DataConfig(source="imagefolder", path=str(tmp_path), split="dualprompt"))
    assert data.class_names == sorted(WNIDS)
    assert data.split["test_fingerprint"] == local.split["test_fingerprint"]  # the same images and labels
    assert data.test.image(0).size == (16, 16)
