"""Time SLCA's classifier-alignment stage against a reference-style per-class loop, in one run.

Stage = class statistics (mean + covariance of each class's features) + Gaussian sampling + head re-training,
at 200 classes x 768-d (ImageNet-R / CUB after the last task), 5 CA epochs, 256 samples per class.
The reference (slca.md, Stage 2) builds a ``MultivariateNormal`` per class per epoch in a Python loop; slca_kit
factors every covariance once (batched Cholesky) and samples all classes with one batched matmul.
Prints the seconds of each path's parts (statistics, factorisation, sampling, head training) and the ratio
reference / slca_kit of the whole stage. ``--device cuda``: each path where its code runs on a GPU. The reference
computes the statistics on the CPU (torch.cov of extracted numpy features, GengDavid/SLCA models/base.py:262), keeps
the covariances there, and moves each class's mean and covariance to the device to build its ``MultivariateNormal``
(models/slca.py:202-205); slca_kit computes the statistics where the features are (the device), stores them on the
CPU and factors them on the device (methods/slca.py). Every part's clock waits for the device's queued work.
Usage: python benchmarks/ca_stage.py [--classes N] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.distributions import MultivariateNormal

from _device import describe, synchronize
from slca_kit import alignment
from slca_kit.alignment import (AlignmentSettings, ClassMoments, align_classifier, cholesky_with_jitter,
                                normalized_logits)
from slca_kit.models.heads import IncrementalHead

PARTS = ("statistics", "factorisation", "sampling", "head training")



class Clock:
    """Seconds spent in named parts of one path, the device's queued work included."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = defaultdict(float)

    @contextlib.contextmanager
    def part(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start


def make_features(classes: int, per_class: int, dim: int, generator: torch.Generator):
    centres = torch.randn(classes, dim, generator=generator)
    mixing = torch.randn(classes, dim, dim // 8, generator=generator) / dim**0.5
    codes = torch.randn(classes, per_class, dim // 8, generator=generator)
    noise = 0.1 * torch.randn(classes, per_class, dim, generator=generator)
    features = centres[:, None] + codes @ mixing.transpose(1, 2) + noise
    return features.reshape(-1, dim), torch.arange(classes).repeat_interleave(per_class)


def make_head(dim: int, task_sizes: list[int], device: torch.device) -> IncrementalHead:
    torch.manual_seed(0)
    head = IncrementalHead(dim)
    for size in task_sizes:
        head.add_task(size)
    return head.to(device)


def reference_stage(features, labels, classes, task_sizes, settings, task_ids, current_task, clock):
    """Per-class torch.cov on the CPU, then per class per epoch a MultivariateNormal on the device (its constructor
    factors the covariance), as the reference code does."""
    device = clock.device
    with clock.part("statistics"):  # features and labels are on the CPU, as the reference's numpy vectors
        means, covs = [], []
        for c in range(classes):
            own = features[labels == c].double()
            means.append(own.mean(0))
            covs.append((torch.cov(own.T) + 1e-4 * torch.eye(own.shape[1], dtype=torch.float64)).float())
    head = make_head(features.shape[1], task_sizes, device)
    optimizer = torch.optim.SGD(head.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    for _ in range(settings.epochs):
        data, target = [], []
        for c in range(classes):
            decay = (task_ids[c].item() + 1) / (current_task + 1) * 0.1
            with clock.part("factorisation"):
                m = MultivariateNormal((means[c].to(device) * (0.9 + decay)).float(), covs[c].to(device))
            with clock.part("sampling"):
                data.append(m.sample((settings.samples_per_class,)))
            target.extend([c] * settings.samples_per_class)
        with clock.part("head training"):
            data, target = torch.cat(data), torch.tensor(target).to(device)
            order = torch.randperm(len(data), device=device)
            data, target = data[order], target[order]
            for start in range(0, len(data), settings.batch_size):
                logits = normalized_logits(head(data[start:start + settings.batch_size]), task_sizes, settings.tau)
                loss = F.cross_entropy(logits, target[start:start + settings.batch_size])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()


def slca_kit_stage(features, labels, classes, task_sizes, settings, task_ids, current_task, clock):
    device = clock.device
    with clock.part("statistics"):
        moments = ClassMoments.from_features(features.to(device), labels.to(device), list(range(classes)))
        means, covs = moments.gaussians(1e-4)
        # what SLCA stores (on the CPU) and factors (as the reference's MultivariateNormal: float32)
        means, covs = means.cpu(), covs.float().cpu()
    with clock.part("factorisation"):
        chol, _ = cholesky_with_jitter(covs.to(device))
    head = make_head(features.shape[1], task_sizes, device)
    sample = alignment.sample_gaussians

    def timed_sample(*args, **kwargs):
        with clock.part("sampling"):
            return sample(*args, **kwargs)

    alignment.sample_gaussians = timed_sample  # align_classifier looks it up at call time
    try:
        with clock.part("alignment loop"):
            align_classifier(head, means.to(device), chol, task_ids.to(device), current_task, task_sizes, settings,
                             torch.Generator(device=device).manual_seed(0))
    finally:
        alignment.sample_gaussians = sample
    clock.seconds["head training"] = clock.seconds.pop("alignment loop") - clock.seconds["sampling"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--per-class", type=int, default=60, help="training images per class")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where both paths run their device work (default: cuda when available)")
    args = parser.parse_args()
    if args.classes % args.tasks:
        parser.error(f"--classes {args.classes} must be a multiple of --tasks {args.tasks} (equal tasks)")
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    features, labels = make_features(args.classes, args.per_class, args.dim, generator)
    task_sizes = [args.classes // args.tasks] * args.tasks
    task_ids = torch.arange(args.tasks).repeat_interleave(args.classes // args.tasks)
    current = args.tasks - 1
    settings = AlignmentSettings(epochs=5, lr=0.01, momentum=0.9, weight_decay=5e-4, samples_per_class=256,
                                 batch_size=256, tau=0.1, mean_shrink=True)
    timings = {}
    for name, stage in (("reference loop", reference_stage), ("slca_kit batched", slca_kit_stage)):
        torch.manual_seed(0)
        clock = Clock(device)
        synchronize(device)
        start = time.perf_counter()
        stage(features, labels, args.classes, task_sizes, settings, task_ids, current, clock)
        synchronize(device)
        timings[name] = time.perf_counter() - start
        parts = "  ".join(f"{part} {clock.seconds[part]:6.2f}" for part in PARTS)
        print(f"{name:18s} {timings[name]:8.2f} s   ({parts})")
    print(f"{args.classes} classes x {args.dim}-d, {describe(device)}, torch {torch.__version__}: "
          f"speed-up {timings['reference loop'] / timings['slca_kit batched']:.2f}x")


if __name__ == "__main__":
    main()
