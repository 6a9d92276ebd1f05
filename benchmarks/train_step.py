"""Training-step overhead: slca_kit's trainer against a plain PyTorch fp32 loop, same model, data and optimizer.

Data: pre-decoded, pre-normalised image tensors in memory, so neither path decodes or augments. Model: a timm ViT at
random init with one linear head: the proxy's shape (32 px, patch 8, 192-d, depth 6) by default, ``--shape tiny``
(32 px, patch 8, 32-d, depth 1: a step of a few milliseconds, where what the trainer adds per step shows) or
``--shape vit-b`` (ViT-B/16 at 224 px). (a) the plain loop the reference trains with: SGD (momentum 0.9, weight
decay 5e-4) with the head at lr and the backbone at lr x 0.01, ``logits[:, known:]``, cross-entropy, zero_grad /
backward / step per batch and the loss read back (``losses += loss.item()``, GengDavid/SLCA models/slca.py:123-133).
(b) slca_kit's ``Trainer._train_epoch`` for ``seq_ft_sl`` and ``slca`` (stage 1: the same loop), with everything it
does per step (accelerate's prepared model, optimizer and loader, the method's loss hook, the finite-loss check, the
progress bar, the stop-signal check, the per-epoch schedule). An A/A control, (a) again on a second copy of the
model, shows the machine's noise. After a warm-up epoch each, the three run epoch by epoch in an order that rotates;
each epoch gives a ratio (b) / (a) and (a') / (a) from adjacent timings, so that drifts in the machine's speed
cancel, and the medians are printed with their 90 % bootstrap intervals and the time (b) adds per step. On a GPU the
pre-decoded images are kept in its memory (no host-to-device copies in either path) and every epoch's clock waits
for the queued work. Usage:
python benchmarks/train_step.py [--images N] [--epochs N] [--batch N] [--shape proxy|tiny|vit-b] [--print-epochs]
[--bf16] [--optimizer-impl fused] [--compile inductor]  (the last three change only slca_kit's path: the accelerator
fast path against the plain loop)
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _device import describe, synchronize
from slca_kit.resolve import config_from_dict
from slca_kit.trainer import Trainer


SHAPES = {"proxy": {"img_size": 32, "patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3},
          "tiny": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
          "vit-b": {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}}


class PreDecoded(torch.utils.data.Dataset):
    """Image tensors already transformed, with the interface the trainer's loader uses."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int):
        return self.images[item], int(self.labels[item])


def synthetic_arrays(folder: Path, images: int, classes: int, size: int) -> Path:
    rng = np.random.RandomState(0)
    train_x = rng.randint(0, 256, size=(images, size, size, 3), dtype=np.uint8)
    train_y = np.arange(images) % classes
    path = folder / "arrays.npz"
    np.savez(path, train_x=train_x, train_y=train_y, test_x=train_x[:classes], test_y=train_y[:classes])
    return path


def recipe(npz: Path, folder: Path, method: str, args) -> dict:
    vit = SHAPES[args.shape]
    size = vit["img_size"]
    return {"name": method, "output_dir": str(folder),
            "data": {"source": "arrays", "path": str(npz), "image_size": size, "transform": "none"},
            "scenario": {"increment": args.classes, "class_order_seed": None},
            "backbone": {"name": "vit_base_patch16_224" if args.shape == "vit-b" else "vit_tiny_patch16_224",
                         "model_kwargs": vit, "pretrained": False},
            "method": {"name": method, "params": {}},
            "train": {"epochs": args.epochs, "batch_size": args.batch, "lr": 0.01, "milestones": [10_000],
                      "mixed_precision": "bf16" if args.bf16 else "no", "optimizer_impl": args.optimizer_impl,
                      "compile_backend": args.compile}}


def prepare_trainer(config, dataset: PreDecoded) -> tuple[Trainer, dict, object]:
    """The trainer at task 0 with its loader, optimizer and scheduler prepared, reading ``dataset`` instead of
    decoding images (only the data source changes)."""
    trainer = Trainer(config)
    trainer.images.training_dataset = lambda *args, **kwargs: dataset
    trainer._task, trainer._timings = 0, {}
    trainer._add_heads_until(0)
    ctx = trainer.context(0)
    trainer.method.before_task(trainer.model, ctx)
    return trainer, trainer._prepare_training(ctx, config.train.epochs), ctx


def plain_epoch(model, optimizer, loader, device) -> float:
    """One task-0 epoch of the reference's loop (known classes 0: ``logits[:, 0:]``); its summed loss."""
    model.train()
    losses = 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        loss = F.cross_entropy(model.head(model.backbone(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses += loss.item()  # the reference logs the epoch's loss: one device sync a step, as the trainer's
    return losses



def step_flops(model, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Floating-point operations of one training step's forward and backward (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model.head(model.backbone(images)), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def plain_path(model, args, data, device):
    """A fresh copy of ``model`` with the reference's optimizer and loader: one plain epoch per call."""
    model = copy.deepcopy(model)
    groups = [{"params": model.head.parameters(), "lr": 0.01},
              {"params": model.backbone.parameters(), "lr": 0.01 * 0.01}]
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True)
    return model, loader, lambda epoch: plain_epoch(model, optimizer, loader, device)


def compare(trainer, prepared, ctx, args, data) -> tuple[dict, float]:
    """Seconds per epoch of (b) slca_kit, (a) the plain loop and (a') the plain loop again, epoch by epoch, and the
    step's floating-point operations per image."""
    device = trainer.accelerator.device
    plain_model, loader, plain = plain_path(trainer.model, args, data, device)
    paths = {"slca_kit": lambda epoch: trainer._train_epoch(prepared, ctx, epoch), "plain": plain,
             "plain again": plain_path(trainer.model, args, data, device)[2]}
    names = list(paths)
    seconds = {name: [] for name in names}
    for epoch in range(args.epochs + 1):
        rotation = epoch % len(names)  # which path goes first rotates, so that none always runs on a warmer cache
        for name in names[rotation:] + names[:rotation]:
            synchronize(device)
            start = time.perf_counter()
            paths[name](epoch)
            synchronize(device)
            if epoch:  # the first epoch of each is a warm-up
                seconds[name].append(time.perf_counter() - start)
    batch = next(iter(loader))
    return seconds, step_flops(plain_model, batch[0].to(device), batch[1].to(device)) / len(batch[1])


def median_interval(ratios: np.ndarray) -> str:
    """The median of per-epoch ratios and its 90 % bootstrap interval: how far this run's machine noise leaves it."""
    resampled = np.random.default_rng(0).choice(ratios, size=(2_000, len(ratios)))
    low, high = np.percentile(np.median(resampled, axis=1), [5, 95])
    return f"{np.median(ratios):.3f} [{low:.3f}, {high:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=12, help="timed epochs per path (after one warm-up epoch)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shape", default="proxy", choices=list(SHAPES), help="the ViT's shape (see above)")
    parser.add_argument("--bf16", action="store_true", help="slca_kit path with bf16 autocast (accelerators)")
    parser.add_argument("--optimizer-impl", default="default", choices=["default", "foreach", "fused"],
                        help="slca_kit path's train.optimizer_impl")
    parser.add_argument("--compile", default=None, metavar="BACKEND", help="slca_kit path's train.compile_backend")
    parser.add_argument("--print-epochs", action="store_true", help="each timed epoch's seconds, per path")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s at the benchmark's precision, to print MFU")
    args = parser.parse_args()
    steps = -(-args.images // args.batch)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        npz = synthetic_arrays(folder, args.images, args.classes, SHAPES[args.shape]["img_size"])
        results = {}
        for method in ("seq_ft_sl", "slca"):
            config = config_from_dict(recipe(npz, folder, method, args))
            probe = Trainer(config)
            images = torch.stack([probe.train_transform(probe.data.train.image(i)) for i in range(args.images)])
            labels = torch.as_tensor(probe.label_map[probe.data.train.labels], dtype=torch.long)
            data = PreDecoded(images.to(probe.accelerator.device), labels)
            trainer, prepared, ctx = prepare_trainer(config, data)
            results[method], flops_per_image = compare(trainer, prepared, ctx, args, data)
        precision = ", slca_kit in bf16" if args.bf16 else ""
        device = trainer.accelerator.device
        print(f"{args.shape} ViT, {args.images} images, batch {args.batch}, {args.epochs} timed epochs, device "
              f"{describe(device)}, torch {torch.__version__}{precision}, slca_kit optimizer {args.optimizer_impl}, "
              f"compile {args.compile}")
        fast_path = args.bf16 or args.optimizer_impl != "default" or args.compile
        target = "target >= 1.8 on a GPU, ViT-B/16 bf16" if fast_path else "target >= 0.97 at fp32"
        for method, seconds in results.items():
            plain, ours, again = (np.array(seconds[name]) for name in ("plain", "slca_kit", "plain again"))
            if args.print_epochs:
                for name, values in (("plain", plain), ("slca_kit", ours), ("plain again", again)):
                    print(f"  {method:9s} {name:11s} seconds: " + " ".join(f"{value:.2f}" for value in values))
            print(f"  {method:9s} plain {args.images / np.median(plain):7.1f} img/s  slca_kit "
                  f"{args.images / np.median(ours):7.1f} img/s  ratio {median_interval(plain / ours)} "
                  f"({target})  A/A {median_interval(plain / again)}  slca_kit adds "
                  f"{np.median(ours - plain) / steps * 1e6:6.0f} us of a {np.median(plain) / steps * 1e3:.2f} ms step")
        achieved = args.images / np.median(results["slca"]["slca_kit"]) * flops_per_image / 1e12
        mfu = f", MFU {achieved / args.peak_tflops:.1%}" if args.peak_tflops else " (--peak-tflops for MFU)"
        print(f"  slca_kit training step: {flops_per_image / 1e9:.2f} GFLOP per image, {achieved:.3f} TFLOP/s{mfu}")


if __name__ == "__main__":
    main()
