"""The SLCA reference transforms (GengDavid/SLCA utils/data.py), scaled from 224 px to ``data.image_size``."""
from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..config import DataConfig

BICUBIC = InterpolationMode.BICUBIC


def _scaled(size: int, reference: int) -> int:
    """A reference size given at 224 px (e.g. Resize 256, Resize 300) scaled to ``size``."""
    return int(round(size * reference / 224))


def build_transforms(cfg: DataConfig) -> tuple[T.Compose, T.Compose]:
    """Return (train, test) transforms for the preset ``cfg.transform``."""
    size = cfg.image_size
    finish = [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    # Resize(256, interpolation=3) = bicubic on every benchmark, also for the features of the class statistics
    # (GengDavid/SLCA utils/data.py:63 CIFAR, :131 ImageNet-R, :159 CUB, :185 Cars).
    test = T.Compose([T.Resize(_scaled(size, 256), interpolation=BICUBIC), T.CenterCrop(size), *finish])
    if cfg.transform in ("pilot", "pilot_cifar"):
        # APER / RanPAC (LAMDA-PILOT's build_transform, RanPAC/RanPAC utils/data.py:20-46): a wide random crop and
        # a flip for training; CIFAR's test images are resized straight to the input size, the others to 256 / 224.
        train = [T.RandomResizedCrop(size, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3)), T.RandomHorizontalFlip()]
        if cfg.transform == "pilot_cifar":
            test = T.Compose([T.Resize(size, interpolation=BICUBIC), T.CenterCrop(size), *finish])
        return T.Compose([*train, *finish]), test
    if cfg.transform == "cifar":
        train = [T.RandomResizedCrop(size, interpolation=BICUBIC), T.RandomHorizontalFlip(),
                 T.ColorJitter(brightness=63 / 255)]
    elif cfg.transform == "imagenet_r":
        train = [T.RandomResizedCrop(size, interpolation=BICUBIC), T.RandomHorizontalFlip()]
    elif cfg.transform == "cub_cars":
        big = _scaled(size, 300)
        train = [T.Resize((big, big), interpolation=BICUBIC), T.RandomCrop(size), T.RandomHorizontalFlip()]
    else:  # "none": resize only, identical for train and test
        plain = T.Compose([T.Resize((size, size), interpolation=BICUBIC), *finish])
        return plain, plain
    return T.Compose([*train, *finish]), test
