"""One process vs two gloo processes (torchrun) on the Flowers-102 proxy, in one run.

1. Class statistics with the backbone as loaded (train.epochs=0): SLCA's means/covariances must agree to float64
   rounding, and the evaluation counts exactly.
2. A full SLCA run: final Last-Acc of 2 processes vs 1 (DDP averages gradients over processes; the target is
   within 0.5 points).
Usage: python benchmarks/ddp_equivalence.py [--skip-full] [--output runs/ddp_check]   (needs ../shared)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from slca_kit import checkpoint as ckpt

RECIPE = "proxy/slca"


def train(processes: int, output: Path, name: str, *overrides: str) -> dict:
    launcher = [sys.executable, "-m", "slca_kit"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        "-m", "slca_kit"]
    run_dir = output / name
    resume = ["--resume"] if ckpt.latest_checkpoint(run_dir / "checkpoints") else []
    if not (run_dir / "results.json").is_file() or not json.loads((run_dir / "results.json").read_text())["complete"]:
        subprocess.run(launcher + ["train", RECIPE, f"output_dir={output}", f"name={name}", *overrides, *resume],
                       check=True)
    return json.loads((run_dir / "results.json").read_text())


def final_state(run_dir: Path) -> dict:
    return torch.load(ckpt.latest_checkpoint(run_dir / "checkpoints") / "custom_checkpoint_0.pkl", weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/ddp_check")
    parser.add_argument("--skip-full", action="store_true", help="only the statistics check")
    parser.add_argument("--reference", help="a finished single-process run of the proxy/slca recipe to reuse")
    args = parser.parse_args()
    output = Path(args.output)
    one = train(1, output, "stats_1proc", "train.epochs=0")
    two = train(2, output, "stats_2proc", "train.epochs=0")
    a, b = final_state(output / "stats_1proc")["method"], final_state(output / "stats_2proc")["method"]
    print(f"statistics, {a['means'].shape[0]} classes x {a['means'].shape[1]}-d: "
          f"max |mean diff| {(a['means'] - b['means']).abs().max().item():.3g}, "
          f"max |cov diff| {(a['covs'] - b['covs']).abs().max().item():.3g}")
    print(f"evaluation counts equal: {one['correct'] == two['correct']}; Last-Acc 1 proc {one['last_acc']:.2f}, "
          f"2 procs {two['last_acc']:.2f}")
    if args.skip_full:
        return
    full_one = (json.loads((Path(args.reference) / "results.json").read_text()) if args.reference
                else train(1, output, "slca_1proc"))
    full_two = train(2, output, "slca_2proc")
    gap = full_two["last_acc"] - full_one["last_acc"]
    print(f"full SLCA run: Last-Acc 1 proc {full_one['last_acc']:.2f}, 2 procs {full_two['last_acc']:.2f} "
          f"(difference {gap:+.2f}); Inc-Acc {full_one['inc_acc']:.2f} vs {full_two['inc_acc']:.2f}")


if __name__ == "__main__":
    main()
