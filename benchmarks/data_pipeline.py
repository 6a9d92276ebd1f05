"""Data pipeline: images/s of the training data loader alone, slca_kit's against a plain torchvision one, next to
the model's images/s, and where a training image's time goes.

Data, generated here (nothing is downloaded): synthetic JPEGs of ImageNet-R / CUB-like sizes (300-500 px a side,
smooth content plus noise, quality 90: 30-70 KB each) in class sub-folders, read (1) as an image folder through
slca_kit's ``imagefolder`` source (``datasets``' imagefolder builder, decoded by slca_kit) and (2) as a Hub-style
``datasets.Dataset`` whose image column holds the encoded bytes (what a Hub dataset holds after download), and
(3) 32 px PNGs in a Hub-style dataset, the way CIFAR-100 is on the Hub, trained at 224 px (CIFAR's preset), also with
``data.augment_on_device`` (decoded once, the batch augmented in one call; here on the CPU).

For each, at 0, 2 and N (= CPU count) workers: slca_kit's training loader (``TaskDataset`` with the preset's train
transform, per-image augmentation seeding, the trainer's sampler and batch size) against the plain loader the
reference codes use (torchvision ``ImageFolder`` or the decoded ``datasets`` rows, the same transform, shuffle), over
``--epochs`` epochs each (worker start-up included, as a run pays it every epoch), the two loaders alternating pass
by pass; the ratio is the median of slca_kit / plain over adjacent passes.
Then, at 0 workers, microseconds per image for: decoding, the transform, reading the row, seeding the augmentation,
and the rest of ``TaskDataset.__getitem__`` (label remapping, index indirection). The model's images/s is a
random-init ViT-B/16 at 224 px training on the device (fp32 at batch 8 on a CPU; bf16 autocast at batch 64 on a GPU),
or ``--model-images-per-s`` (from benchmarks/train_step.py). With ``--device cuda`` every loader's batches are sent
to the GPU, as the trainer's prepared loader sends them, the batched augmentation runs there, and each pass's clock
waits for the GPU's queued work. Usage:
python benchmarks/data_pipeline.py [--images N] [--epochs N] [--batch N] [--model-images-per-s X] [--device D]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import send_to_device
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from _device import describe, synchronize
from slca_kit.config import DataConfig
from slca_kit.data.device_augment import AugmentedLoader, BatchAugment, DecodedTaskDataset, decode_all
from slca_kit.data.sources import HubSplit, load_data
from slca_kit.data.task_data import EpochShuffleSampler, TaskDataset
from slca_kit.data.transforms import build_transforms


def synthetic_photo(rng: np.random.RandomState, width: int, height: int) -> Image.Image:
    """Low-frequency colour structure with fine noise: JPEG sizes and decode times like real photos'."""
    coarse = Image.fromarray(rng.randint(0, 256, size=(6, 6, 3), dtype=np.uint8)).resize((width, height),
                                                                                         Image.BICUBIC)
    noise = rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def write_image_folder(root: Path, images: int, classes: int) -> None:
    rng = np.random.RandomState(0)
    for index in range(images):
        folder = root / "train" / f"class_{index % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = rng.randint(300, 501, size=2)
        synthetic_photo(rng, width, height).save(folder / f"{index:05d}.jpg", quality=90)
    # a test split, which slca_kit's imagefolder source expects beside train
    test = root / "test"
    for folder in sorted((root / "train").iterdir()):
        (test / folder.name).mkdir(parents=True, exist_ok=True)
        first = next(folder.iterdir())
        (test / folder.name / first.name).write_bytes(first.read_bytes())


def hub_style(files: list[tuple[bytes, int]]):
    """A ``datasets.Dataset`` with an encoded image column and integer labels, as a Hub dataset is after download."""
    from datasets import ClassLabel, Dataset as HubDataset, Features, Image as ImageFeature

    classes = max(label for _, label in files) + 1
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=classes)})
    return HubDataset.from_dict({"image": [{"bytes": data, "path": None} for data, _ in files],
                                 "label": [label for _, label in files]}, features=features)


def small_pngs(images: int, classes: int) -> list[tuple[bytes, int]]:
    rng = np.random.RandomState(1)
    files = []
    for index in range(images):
        buffer = io.BytesIO()
        synthetic_photo(rng, 32, 32).save(buffer, format="PNG")
        files.append((buffer.getvalue(), index % classes))
    return files


class PlainRows(Dataset):
    """The reference codes' way with a ``datasets`` split: the row decoded by ``datasets``, then the transform."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int):
        row = self.dataset[item]
        return self.transform(row["image"].convert("RGB")), row["label"]


class ToDevice:
    """A loader whose batches are sent to ``device``, as accelerate's prepared loader sends the trainer's."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield send_to_device(batch, self.device)



def slca_loader(split, transform, batch: int, workers: int) -> DataLoader:
    """What ``Trainer._prepare_training`` builds for a task of every class (seed 1993, task 0)."""
    classes = sorted(set(split.labels.tolist()))
    dataset = TaskDataset(split, np.arange(len(classes)), classes, transform, augment_seed=1993 * 1_000)
    sampler = EpochShuffleSampler(len(dataset), 1993 * 1_000)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers)


def on_device_loader(decoded: np.ndarray, split, transform, batch: int, workers: int,
                     device: torch.device) -> AugmentedLoader:
    """``data.augment_on_device``: images decoded once, parameters drawn in the loader, the batch augmented on
    ``device`` (on a CPU-only machine its CPU stands in for the accelerator)."""
    classes = sorted(set(split.labels.tolist()))
    augment = BatchAugment(transform)
    dataset = DecodedTaskDataset(decoded, augment, split, np.arange(len(classes)), classes, transform,
                                 augment_seed=1993 * 1_000)
    sampler = EpochShuffleSampler(len(dataset), 1993 * 1_000)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers)
    return AugmentedLoader(ToDevice(loader, device), augment)


def epoch_rate(loader, epoch: int, device: torch.device) -> float:
    """Images/s of one full pass to ``device``, its workers' start-up included."""
    inner = loader
    while not isinstance(inner, DataLoader):
        inner = inner.loader
    if hasattr(inner.sampler, "set_epoch"):  # slca_kit's loaders
        inner.sampler.set_epoch(epoch)
        inner.dataset.set_epoch(epoch)
    synchronize(device)
    start, count = time.perf_counter(), 0
    for images, _ in (loader if isinstance(loader, (ToDevice, AugmentedLoader)) else ToDevice(loader, device)):
        count += len(images)
    synchronize(device)
    return count / (time.perf_counter() - start)


def paired_rates(ours, plain, epochs: int, device: torch.device) -> tuple[float, float, float]:
    """Median images/s of each loader and the median ratio ours / plain of adjacent passes: the two alternate pass
    by pass (which goes first too), so that drifts in the machine's speed cancel."""
    pairs = []
    for epoch in range(epochs):
        if epoch % 2:
            plain_rate = epoch_rate(plain, epoch, device)
            pairs.append((epoch_rate(ours, epoch, device), plain_rate))
        else:
            pairs.append((epoch_rate(ours, epoch, device), epoch_rate(plain, epoch, device)))
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(a / b for a, b in pairs))


class ReadAlready:
    """A split whose images were read beforehand: ``TaskDataset`` over it times only its own work."""

    def __init__(self, split, count: int):
        self.labels = split.labels
        self.images = {index: split.image(index) for index in range(count)}

    def image(self, index: int) -> Image.Image:
        return self.images[index]


def per_image_costs(split, transform, count: int) -> dict[str, float]:
    """Microseconds per image of each part of slca_kit's per-sample path, at 0 workers."""
    indices = list(range(min(count, len(split))))

    def mean_us(work) -> float:
        start = time.perf_counter()
        for index in indices:
            work(index)
        return (time.perf_counter() - start) / len(indices) * 1e6

    read_already = ReadAlready(split, len(indices))
    rows = {i: split.dataset[i][split.image_column] for i in indices}
    decode = mean_us(lambda i: Image.open(io.BytesIO(rows[i]["bytes"])).convert("RGB") if rows[i].get("bytes")
                     else Image.open(rows[i]["path"]).convert("RGB"))
    classes = sorted(set(split.labels.tolist()))
    own = TaskDataset(read_already, np.arange(len(classes)), classes, lambda image: image, augment_seed=7)
    whole = TaskDataset(split, np.arange(len(classes)), classes, transform, augment_seed=7)

    def seeding(index):  # what TaskDataset does around each image
        state = torch.default_generator.get_state()
        torch.default_generator.manual_seed(((7 * 1_000_003) * 100_003 + index) % 2**63)
        torch.default_generator.set_state(state)

    def seeding_before(index):  # what it did before: torch.manual_seed seeds every device's generator too
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((7 * 1_000_003) * 100_003 + index) % 2**63)

    return {"read the row": mean_us(split.image) - decode, "decode": decode,
            "transform": mean_us(lambda i: transform(read_already.image(i))),
            "seed the augmentation": mean_us(seeding), "(seeding with torch.manual_seed)": mean_us(seeding_before),
            "index + remap + seeding (TaskDataset's own)": mean_us(lambda i: own[i]),
            "TaskDataset item, whole": mean_us(lambda i: whole[i])}


def model_rate(device: torch.device, batch: int, steps: int) -> float:
    """Training images/s of a random-init ViT-B/16 at 224 px (SGD) on ``device``: fp32 on a CPU, bf16 autocast on a
    GPU (the accelerator fast path)."""
    import timm

    model = timm.create_model("vit_base_patch16_224", num_classes=100).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    precision = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for step in range(steps + 1):
        synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad()
        with precision:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        synchronize(device)
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="training images per source")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6, help="timed passes per loader (median)")
    parser.add_argument("--batch", type=int, default=48, help="the presets' batch (SLCA: 128; 48 keeps it short)")
    parser.add_argument("--model-images-per-s", type=float, default=None,
                        help="the model's training images/s (default: ViT-B/16 measured here on the device)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where batches go and are augmented with augment_on_device (default: cuda when available)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cpus = os.cpu_count() or 1
    workers = sorted({0, 2, cpus})
    print(f"{cpus} CPUs, torch {torch.__version__}, device {describe(device)}; "
          f"{args.images} images, batch {args.batch}, median of {args.epochs} epochs")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(root / "hf_cache")  # the imagefolder builder's cache, thrown away
        write_image_folder(root / "jpeg", args.images, args.classes)
        cfg = DataConfig(source="imagefolder", path=str(root / "jpeg"), image_size=224, transform="imagenet_r")
        train_transform, _ = build_transforms(cfg)
        folder_split = load_data(cfg).train
        jpegs = sorted((root / "jpeg" / "train").rglob("*.jpg"))
        jpeg_files = [(path.read_bytes(), int(path.parent.name[-3:])) for path in jpegs]
        hub = hub_style(jpeg_files)
        hub_split = HubSplit(hub, "image", np.asarray(hub["label"]), "hub-style jpeg")
        small = hub_style(small_pngs(args.images, args.classes))
        small_cfg = DataConfig(source="arrays", image_size=224, transform="cifar")
        small_transform, _ = build_transforms(small_cfg)
        small_split = HubSplit(small, "image", np.asarray(small["label"]), "hub-style 32 px png")
        from torchvision.datasets import ImageFolder

        cases = [("image folder, 224 px JPEG", folder_split, ImageFolder(str(root / "jpeg" / "train"), train_transform),
                  train_transform),
                 ("Hub-style, 224 px JPEG", hub_split, PlainRows(hub, train_transform), train_transform),
                 ("Hub-style, 32 px PNG (CIFAR-like)", small_split, PlainRows(small, small_transform), small_transform)]
        print("\nloader images/s (slca_kit | plain | ratio)")
        best = {}
        for name, split, plain, transform in cases:
            for count in workers:
                ours, reference, ratio = paired_rates(
                    slca_loader(split, transform, args.batch, count),
                    DataLoader(plain, batch_size=args.batch, shuffle=True, num_workers=count), args.epochs, device)
                best[name] = max(best.get(name, 0.0), ours)
                print(f"  {name:36s} {count:2d} workers: {ours:8.1f} | {reference:8.1f} | {ratio:.3f}")
        start = time.perf_counter()
        decoded = decode_all(small_split)
        print(f"\ndata.augment_on_device, 32 px PNG (CIFAR-like): decoding once took "
              f"{time.perf_counter() - start:.2f} s ({decoded.nbytes / 2**20:.1f} MiB); loader + batched augmentation "
              f"on {device}, images/s (on device | per-image PIL path | ratio)")
        for count in workers:
            ours, per_image, ratio = paired_rates(
                on_device_loader(decoded, small_split, small_transform, args.batch, count, device),
                slca_loader(small_split, small_transform, args.batch, count), args.epochs, device)
            best["32 px PNG, augment_on_device"] = max(best.get("32 px PNG, augment_on_device", 0.0), ours)
            print(f"  {count:2d} workers: {ours:8.1f} | {per_image:8.1f} | {ratio:.2f}")
        print("\nslca_kit's per-image path at 0 workers (microseconds per image)")
        for name, split, _, transform in cases:
            costs = per_image_costs(split, transform, min(args.images, 128))
            print(f"  {name}: " + ", ".join(f"{part} {value:.0f}" for part, value in costs.items()))
    model_batch, precision = (64, "bf16") if device.type == "cuda" else (8, "fp32")
    model = args.model_images_per_s or model_rate(device, model_batch, steps=10 if device.type == "cuda" else 3)
    source = ("given" if args.model_images_per_s
              else f"ViT-B/16 224 px {precision} training, batch {model_batch}, {device}")
    print(f"\nmodel: {model:.1f} images/s ({source})")
    for name, rate in best.items():
        bottleneck = "the loader" if rate < model else "the model"
        print(f"  {name}: best loader {rate:.1f} images/s -> the bottleneck is {bottleneck} "
              f"(loader / model {rate / model:.1f})")


if __name__ == "__main__":
    main()
