"""Memory of SLCA's stored class statistics, ``covariance: full`` against ``covariance: lowrank``, in one run.

Builds the statistics both ways from the same features (``ClassMoments`` -> covariances -> ``LowRankCovariances``)
at 200 classes x 768-d (ImageNet-R / CUB after the last task) and prints the bytes each keeps (what the method holds
in memory and writes to every checkpoint), their ratio, the seconds each takes to build and to draw one alignment
epoch (256 samples per class), and how close the low-rank covariance is (relative Frobenius error, exact diagonal).
The same byte counts follow for 1,000 classes x 1,024-d (ViT-L), from the shapes.
Usage: python benchmarks/covariance_memory.py [--classes N] [--dim D] [--rank K]
"""
from __future__ import annotations

import argparse
import time

import torch

from slca_kit.alignment import ClassMoments, LowRankCovariances, cholesky_with_jitter, sample_gaussians

from ca_stage import make_features

MIB = 2 ** 20


def stored_bytes(classes: int, dim: int, rank: int | None) -> int:
    """float32 numbers kept per class: d x d, or d x k + k + d."""
    per_class = dim * dim if rank is None else dim * rank + rank + dim
    return 4 * classes * per_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=60)
    args = parser.parse_args()
    features, labels = make_features(args.classes, args.per_class, args.dim, torch.Generator().manual_seed(0))
    moments = ClassMoments.from_features(features, labels, list(range(args.classes)))
    means, covs = moments.gaussians(1e-4)

    start = time.perf_counter()
    full = covs.float()
    chol, _ = cholesky_with_jitter(covs)
    chol = chol.float()
    full_build = time.perf_counter() - start
    start = time.perf_counter()
    low = LowRankCovariances.from_covariances(covs, args.rank).float()
    low_build = time.perf_counter() - start

    draws = {}
    for name, factor in (("full", chol), ("lowrank", low)):
        start = time.perf_counter()
        sample_gaussians(means.float(), factor, 256, torch.Generator().manual_seed(1))
        draws[name] = time.perf_counter() - start

    full_bytes = full.numel() * full.element_size()
    low_bytes = low.nbytes
    dense = low.dense().double()
    error = float(torch.linalg.matrix_norm(dense - covs).mean() / torch.linalg.matrix_norm(covs).mean())
    diagonal = float((dense.diagonal(dim1=-2, dim2=-1) - covs.diagonal(dim1=-2, dim2=-1)).abs().max())
    print(f"{args.classes} classes x {args.dim}-d, rank {args.rank}, {torch.get_num_threads()} threads")
    print(f"  full:    {full_bytes / MIB:8.1f} MiB stored, build {full_build:6.2f} s (incl. Cholesky), "
          f"one epoch of draws {draws['full']:6.2f} s")
    print(f"  lowrank: {low_bytes / MIB:8.1f} MiB stored, build {low_build:6.2f} s (eigh), "
          f"one epoch of draws {draws['lowrank']:6.2f} s")
    print(f"  memory lowrank / full: {low_bytes / full_bytes:.4f}  (target <= 0.25)")
    print(f"  relative Frobenius error of the low-rank covariance: {error:.4f}; largest diagonal error {diagonal:.2e}")
    big_full, big_low = stored_bytes(1000, 1024, None), stored_bytes(1000, 1024, args.rank)
    print(f"  1000 classes x 1024-d (from the shapes): full {big_full / MIB:.0f} MiB, lowrank {big_low / MIB:.0f} MiB, "
          f"ratio {big_low / big_full:.4f}")


if __name__ == "__main__":
    main()
