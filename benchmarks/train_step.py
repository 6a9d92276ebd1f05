"""Training-step overhead: slca_kit's trainer against a plain PyTorch fp32 loop, same model, data and optimizer.

Data: pre-decoded, pre-normalised image tensors in memory, so neither path decodes or augments. Model: a timm ViT
(default the proxy's shape: 32 px, patch 8, 192-d, depth 6; ``--vit-b`` for ViT-B/16 at 224 px) at random init with
one linear head. (a) the plain loop the reference trains with: SGD (momentum 0.9, weight decay 5e-4) with the head at
lr and the backbone at lr x 0.01, ``logits[:, known:]``, cross-entropy, zero_grad / backward / step per batch.
(b) slca_kit's ``Trainer._train_epoch`` for ``seq_ft_sl`` and ``slca`` (stage 1: the same loop), with everything it
does per step (accelerate's prepared model, optimizer and loader, the method's loss hook, the finite-loss check, the
progress bar, the stop-signal check, the per-epoch schedule). The paths alternate epoch by epoch (and which goes first)
after a warm-up epoch each; the median images/s of each is printed with the ratio (b) / (a). Usage:
python benchmarks/train_step.py [--images N] [--epochs N] [--batch N] [--vit-b] [--bf16] [--optimizer-impl fused]
[--compile inductor]  (the last three change only slca_kit's path: the accelerator fast path against the plain loop)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import slca_kit.trainer as trainer_module
from slca_kit.resolve import config_from_dict
from slca_kit.trainer import Trainer


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
    vit = ({"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12} if args.vit_b else
           {"img_size": 32, "patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3})
    size = vit["img_size"]
    return {"name": method, "output_dir": str(folder),
            "data": {"source": "arrays", "path": str(npz), "image_size": size, "transform": "none"},
            "scenario": {"increment": args.classes, "class_order_seed": None},
            "backbone": {"name": "vit_base_patch16_224" if args.vit_b else "vit_tiny_patch16_224",
                         "model_kwargs": vit, "pretrained": False},
            "method": {"name": method, "params": {}},
            "train": {"epochs": args.epochs, "batch_size": args.batch, "lr": 0.01, "milestones": [10_000],
                      "mixed_precision": "bf16" if args.bf16 else "no", "optimizer_impl": args.optimizer_impl,
                      "compile_backend": args.compile}}


@contextlib.contextmanager
def predecoded_task_data(dataset: PreDecoded):
    """The trainer builds this dataset instead of decoding images (only the data source changes)."""
    original = trainer_module.TaskDataset
    trainer_module.TaskDataset = lambda *args, **kwargs: dataset
    try:
        yield
    finally:
        trainer_module.TaskDataset = original


def prepare_trainer(config) -> tuple[Trainer, dict, object]:
    trainer = Trainer(config)
    trainer._task, trainer._timings = 0, {}
    trainer._add_heads_until(0)
    ctx = trainer.context(0)
    trainer.method.before_task(trainer.model, ctx)
    return trainer, trainer._prepare_training(ctx, config.train.epochs), ctx


def plain_epoch(model, optimizer, loader, device) -> None:
    """One task-0 epoch of the reference's loop (known classes 0: ``logits[:, 0:]``)."""
    model.train()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        loss = F.cross_entropy(model.head(model.backbone(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def step_flops(model, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Floating-point operations of one training step's forward and backward (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model.head(model.backbone(images)), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per path (after one warm-up epoch)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vit-b", action="store_true", help="ViT-B/16 at 224 px instead of the proxy's shape")
    parser.add_argument("--bf16", action="store_true", help="slca_kit path with bf16 autocast (accelerators)")
    parser.add_argument("--optimizer-impl", default="default", choices=["default", "foreach", "fused"],
                        help="slca_kit path's train.optimizer_impl")
    parser.add_argument("--compile", default=None, metavar="BACKEND", help="slca_kit path's train.compile_backend")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s at the benchmark's precision, to print MFU")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        npz = synthetic_arrays(folder, args.images, args.classes, 224 if args.vit_b else 32)
        results = {}
        for method in ("seq_ft_sl", "slca"):
            config = config_from_dict(recipe(npz, folder, method, args))
            probe = Trainer(config)
            images = torch.stack([probe.train_transform(probe.data.train.image(i)) for i in range(args.images)])
            labels = torch.as_tensor(probe.label_map[probe.data.train.labels], dtype=torch.long)
            data = PreDecoded(images, labels)
            with predecoded_task_data(data):
                trainer, prepared, ctx = prepare_trainer(config)
            device = trainer.accelerator.device
            plain_model = copy.deepcopy(trainer.model)
            groups = [{"params": plain_model.head.parameters(), "lr": 0.01},
                      {"params": plain_model.backbone.parameters(), "lr": 0.01 * 0.01}]
            optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=5e-4)
            loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True)
            plain, ours = [], []
            for epoch in range(args.epochs + 1):
                if epoch % 2:  # which path goes first alternates, so that neither always runs on a warmer cache
                    our_seconds = timed(lambda: trainer._train_epoch(prepared, ctx, epoch))
                    plain_seconds = timed(lambda: plain_epoch(plain_model, optimizer, loader, device))
                else:
                    plain_seconds = timed(lambda: plain_epoch(plain_model, optimizer, loader, device))
                    our_seconds = timed(lambda: trainer._train_epoch(prepared, ctx, epoch))
                if epoch:  # the first epoch of each is a warm-up
                    plain.append(args.images / plain_seconds)
                    ours.append(args.images / our_seconds)
            results[method] = (statistics.median(plain), statistics.median(ours))
            batch = next(iter(loader))
            flops_per_image = step_flops(copy.deepcopy(plain_model), batch[0].to(device), batch[1].to(device)) / len(
                batch[1])
        print(f"{'ViT-B/16 224 px' if args.vit_b else 'proxy ViT 32 px'}, {args.images} images, batch {args.batch}, "
              f"{args.epochs} timed epochs, device {device}, {torch.get_num_threads()} threads"
              f"{', slca_kit in bf16' if args.bf16 else ''}, slca_kit optimizer {args.optimizer_impl}, "
              f"compile {args.compile}")
        for method, (plain_rate, our_rate) in results.items():
            print(f"  {method:9s} plain loop {plain_rate:8.1f} img/s   slca_kit {our_rate:8.1f} img/s   "
                  f"ratio {our_rate / plain_rate:.3f}  (target >= 0.97 at fp32)")
        achieved = results["slca"][1] * flops_per_image / 1e12
        mfu = f", MFU {achieved / args.peak_tflops:.1%}" if args.peak_tflops else " (--peak-tflops for MFU)"
        print(f"  slca_kit training step: {flops_per_image / 1e9:.2f} GFLOP per image, {achieved:.3f} TFLOP/s{mfu}")


if __name__ == "__main__":
    main()
