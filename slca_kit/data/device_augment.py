"""``data.augment_on_device``: the training images decoded once into one uint8 array, and the preset's train
transform applied to whole batches on the accelerator instead of image by image with PIL in the loader.

Each image's random parameters (crop box, flip, brightness) are drawn by torchvision's own ``get_params`` in the
order the PIL transform draws them, under the same per-image seed (``TaskDataset``), so a run draws the boxes and
flips the PIL path would. What differs is the resampling: one ``grid_sample`` over the batch with the preset's
filter (bicubic or bilinear; torch's bicubic kernel has a = -0.75 where PIL's has -0.5) and no antialiasing, where
PIL resizes image by image. The option is for small images that the crop enlarges (CIFAR-100 at 224 px, the proxy).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..errors import ConfigError
from .sources import ImageSplit
from .task_data import TaskDataset


class BatchAugment:
    """The random crop / flip / brightness and the normalisation of a train transform (a ``T.Compose`` of the
    presets' steps), split into per-image parameter draws (``draw``, CPU, in the loader) and one batched
    application (``apply``, on the device)."""

    def __init__(self, transform: T.Compose):
        self.size, self.resize, self.crop, self.flip, self.brightness = None, None, None, 0.0, None
        self.mean = self.std = None
        self.mode = "bilinear"
        for step in transform.transforms:
            if isinstance(step, (T.RandomResizedCrop, T.Resize)) and step.interpolation == InterpolationMode.BICUBIC:
                self.mode = "bicubic"
            if isinstance(step, T.RandomResizedCrop):
                self.size, self.crop = step.size, step
            elif isinstance(step, T.Resize):  # cub_cars: Resize((big, big)) then RandomCrop; none: Resize only
                self.resize, self.size = step.size, step.size
            elif isinstance(step, T.RandomCrop):
                self.size, self.crop = step.size, step
            elif isinstance(step, T.RandomHorizontalFlip):
                self.flip = step.p
            elif isinstance(step, T.ColorJitter) and not (step.contrast or step.saturation or step.hue):
                self.brightness = step.brightness
            elif isinstance(step, T.Normalize):
                self.mean, self.std = torch.tensor(step.mean), torch.tensor(step.std)
            elif not isinstance(step, T.ToTensor):
                raise ConfigError(f"data.augment_on_device: the train transform's step {step} has no batched form; "
                                  "supported: the cifar, imagenet_r, cub_cars, pilot, pilot_cifar and none presets")
        self.size, self.resize = _pair(self.size), _pair(self.resize)

    def draw(self, height: int, width: int) -> torch.Tensor:
        """One image's parameters from the global RNG, in the PIL transform's order of draws: crop box x1, y1, x2, y2
        (pixels of the decoded image), flip (0 / 1), brightness factor."""
        x1, y1, x2, y2 = 0.0, 0.0, float(width), float(height)
        if isinstance(self.crop, T.RandomResizedCrop):
            top, left, h, w = T.RandomResizedCrop.get_params(torch.empty(1, height, width), self.crop.scale,
                                                             self.crop.ratio)
            x1, y1, x2, y2 = left, top, left + w, top + h
        elif isinstance(self.crop, T.RandomCrop):  # a crop of the image resized to self.resize
            big_h, big_w = self.resize
            top, left, h, w = T.RandomCrop.get_params(torch.empty(1, big_h, big_w), self.size)
            sy, sx = height / big_h, width / big_w
            x1, y1, x2, y2 = left * sx, top * sy, (left + w) * sx, (top + h) * sy
        flip = float(torch.rand(1) < self.flip) if self.flip else 0.0
        factor = 1.0
        if self.brightness is not None:
            factor = float(T.ColorJitter.get_params(self.brightness, None, None, None)[1])
        return torch.tensor([x1, y1, x2, y2, flip, factor])

    def apply(self, images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, C, H, W] and their parameters [B, 6] (same device) -> normalised float [B, C, size]."""
        x = images.float().div_(255)
        height, width = x.shape[-2:]
        p = parameters.to(x)
        # output pixel centres u in (-1, 1) sample the box at x1 + (x2 - x1) (u + 1) / 2 (align_corners=False)
        theta = torch.zeros(len(x), 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = (p[:, 2] - p[:, 0]) / width * (1 - 2 * p[:, 4])  # a flip mirrors the sampling
        theta[:, 0, 2] = (p[:, 0] + p[:, 2]) / width - 1
        theta[:, 1, 1] = (p[:, 3] - p[:, 1]) / height
        theta[:, 1, 2] = (p[:, 1] + p[:, 3]) / height - 1
        grid = F.affine_grid(theta, [len(x), x.shape[1], *self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode=self.mode, padding_mode="border", align_corners=False).clamp_(0, 1)
        x = (x * p[:, 5, None, None, None]).clamp_(0, 1)  # adjust_brightness: a blend with black
        return (x - self.mean.to(x)[:, None, None]) / self.std.to(x)[:, None, None]


def _pair(size):
    """A transform's size as (height, width); None stays None."""
    if size is None:
        return None
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def decode_all(split: ImageSplit) -> np.ndarray:
    """Every image of ``split`` as one uint8 array [N, C, H, W]; the images must share one size."""
    first = np.asarray(split.image(0))
    images = np.empty((len(split), first.shape[2], *first.shape[:2]), dtype=np.uint8)
    for index in range(len(split)):
        image = np.asarray(split.image(index))
        if image.shape != first.shape:
            raise ConfigError(f"data.augment_on_device: {split.name} image {index} is {image.shape[1]}x"
                              f"{image.shape[0]} px, image 0 is {first.shape[1]}x{first.shape[0]}; the option is for "
                              "benchmarks whose images share one size (CIFAR-100, the Flowers proxy)")
        images[index] = image.transpose(2, 0, 1)
    return images


class DecodedTaskDataset(TaskDataset):
    """``TaskDataset`` over images decoded once: yields ((uint8 image, its parameters), label); ``BatchAugment``
    finishes the batch on the device."""

    def __init__(self, decoded: np.ndarray, augment: BatchAugment, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decoded, self.augment = decoded, augment

    def _load(self, index: int):
        image = torch.from_numpy(self.decoded[index])
        return image, self.augment.draw(*image.shape[1:])


class AugmentedLoader:
    """A prepared training loader whose batches ((uint8, parameters), labels) leave augmented on the device."""

    def __init__(self, loader, augment: BatchAugment):
        self.loader, self.augment = loader, augment

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for (images, parameters), labels in self.loader:
            yield self.augment.apply(images, parameters), labels
