"""data.augment_on_device (slca_kit/data/device_augment.py): the batched crop equals torch's interpolation written
another way, each image gets the crop, flip and brightness the PIL path draws under the same seed (only the
resampling differs), a run trains and resumes mid-task bitwise, and bad input is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from slca_kit import checkpoint as ckpt
from slca_kit.config import DataConfig
from slca_kit.data.device_augment import BatchAugment, DecodedTaskDataset, decode_all
from slca_kit.data.sources import ArraySplit
from slca_kit.data.task_data import TaskDataset
from slca_kit.data.transforms import build_transforms
from slca_kit.errors import ConfigError
from slca_kit.resolve import config_from_dict
from slca_kit.trainer import Trainer

from conftest import Interrupted, interrupt_before_epoch, tiny_recipe


def _smooth_images(count: int, size: int = 32) -> np.ndarray:
    """Smooth colour fields with an off-centre bright blob: a wrong crop, flip or brightness moves many pixels,
    while two resampling filters agree closely."""
    rng = np.random.RandomState(0)
    ys, xs = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(count):
        a, b, c = rng.uniform(0.2, 1.0, size=3)
        cy, cx = rng.uniform(0.15, 0.4, size=2)
        blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 0.02)
        image = np.stack([a * xs, b * ys, c * (1 - xs)], axis=-1) * 120 + blob[..., None] * 120
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(images)


def _transforms(preset: str, size: int):
    return build_transforms(DataConfig(source="arrays", transform=preset, image_size=size, mean=[0.5, 0.4, 0.3],
                                       std=[0.2, 0.25, 0.3]))


def test_a_whole_image_box_is_interpolation_and_same_size_is_to_tensor_normalize():
    images = torch.from_numpy(_smooth_images(3).transpose(0, 3, 1, 2).copy())
    whole = torch.tensor([[0.0, 0.0, 32.0, 32.0, 0.0, 1.0]]).repeat(3, 1)
    mean, std = torch.tensor([0.5, 0.4, 0.3])[:, None, None], torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    for preset, mode in (("none", "bicubic"), ("pilot", "bilinear")):  # none resizes bicubic, pilot's crop bilinear
        augment = BatchAugment(_transforms(preset, 56)[0])
        assert augment.mode == mode
        expected = F.interpolate(images.float() / 255, size=(56, 56), mode=mode, align_corners=False).clamp(0, 1)
        whole_unflipped = whole.clone()
        assert torch.allclose(augment.apply(images, whole_unflipped), (expected - mean) / std, atol=1e-4), preset
        flipped = whole.clone()
        flipped[:, 4] = 1
        assert torch.allclose(augment.apply(images, flipped), ((expected - mean) / std).flip(-1), atol=1e-4)
    plain = _transforms("none", 32)[0]  # the PIL path at the native size is ToTensor + Normalize
    pil = torch.stack([plain(Image.fromarray(image)) for image in _smooth_images(3)])
    assert torch.allclose(BatchAugment(plain).apply(images, whole), pil, atol=1e-5)


@pytest.mark.parametrize("preset", ["cifar", "imagenet_r", "cub_cars", "pilot"])
def test_each_image_gets_the_pil_paths_crop_flip_and_brightness(preset):
    images = _smooth_images(24)
    labels = np.arange(24) % 4
    split = ArraySplit(images, labels, "smooth")
    train, _ = _transforms(preset, 32)
    augment = BatchAugment(train)
    pil = TaskDataset(split, np.arange(4), [0, 1, 2, 3], train, augment_seed=5)
    device = DecodedTaskDataset(decode_all(split), augment, split, np.arange(4), [0, 1, 2, 3], train,
                                augment_seed=5)
    other_epoch = DecodedTaskDataset(decode_all(split), augment, split, np.arange(4), [0, 1, 2, 3], train,
                                     augment_seed=5)
    other_epoch.set_epoch(1)

    def batch(dataset):
        items = [dataset[i] for i in range(len(dataset))]
        return augment.apply(torch.stack([x for (x, _), _ in items]), torch.stack([p for (_, p), _ in items]))

    reference = torch.stack([pil[i][0] for i in range(len(pil))])
    same = (batch(device) - reference).abs().mean(dim=(1, 2, 3))
    different = (batch(other_epoch) - reference).abs().mean(dim=(1, 2, 3))
    # the same draws leave only the resampling filter's difference; other draws are far off for most images
    assert same.max() < 0.03, same
    assert float(different.median()) > 10 * float(same.median()), (same, different)


def _recipe(npz, folder, **data):
    recipe = tiny_recipe(npz, folder, data={"augment_on_device": True, "transform": "cifar", **data},
                         train={"epochs": 3, "checkpoint_every_epoch": True, "keep_checkpoints": 10})
    return config_from_dict(recipe)


def test_a_run_trains_and_resumes_mid_task_bitwise(tiny_npz, tmp_path):
    reference_trainer = Trainer(_recipe(tiny_npz, tmp_path / "ref"))
    reference = reference_trainer.run()
    assert all(np.isfinite(value) for value in reference["seen_accuracy"])
    interrupted = Trainer(_recipe(tiny_npz, tmp_path / "cut"))
    interrupt_before_epoch(interrupted, task=1, epoch=2)
    with pytest.raises(Interrupted):
        interrupted.run()
    assert ckpt.latest_checkpoint(tmp_path / "cut" / "tiny_slca" / "checkpoints").name == "task_001_epoch_001"
    resumed_trainer = Trainer(_recipe(tiny_npz, tmp_path / "cut"))
    resumed = resumed_trainer.run(resume=True)
    assert resumed["correct"] == reference["correct"]
    for name, value in reference_trainer.model.state_dict().items():
        assert torch.equal(value, resumed_trainer.model.state_dict()[name]), name


def test_bad_input_is_refused(tiny_npz, tmp_path):
    with pytest.raises(ConfigError, match="data.augment_on_device: cannot be combined with train.feature_cache"):
        recipe = tiny_recipe(tiny_npz, tmp_path, data={"augment_on_device": True}, train={"feature_cache": True})
        config_from_dict(recipe)
    split = ArraySplit(np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]), "mixed")
    split.image = lambda index: Image.new("RGB", (8 + index, 8))
    with pytest.raises(ConfigError, match="image 1 is 9x8 px, image 0 is 8x8"):
        decode_all(split)
    from torchvision import transforms as T

    with pytest.raises(ConfigError, match="has no batched form"):
        BatchAugment(T.Compose([T.RandomRotation(10), T.ToTensor()]))


def test_images_of_mixed_sizes_are_refused_when_the_trainer_is_built(tmp_path):
    for split, sizes in (("train", [(8, 8), (8, 8), (9, 8), (8, 8)]), ("test", [(8, 8)] * 2)):
        for index, size in enumerate(sizes):
            folder = tmp_path / "images" / split / f"class_{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, color=(index * 40, 0, 0)).save(folder / f"{index}.png")
    recipe = tiny_recipe(tmp_path / "unused.npz", tmp_path / "runs", scenario={"increment": 1},
                         data={"source": "imagefolder", "path": str(tmp_path / "images"), "num_classes": 2,
                               "augment_on_device": True})
    with pytest.raises(ConfigError, match="is 9x8 px, image 0 is 8x8"):
        Trainer(config_from_dict(recipe))
