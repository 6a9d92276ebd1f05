"""What the benchmark scripts share: waiting for an accelerator's queued work before a clock is read."""
from __future__ import annotations

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` so that a clock read afterwards counts it (a CPU runs its work as it is
    called)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def describe(device: torch.device) -> str:
    """The device as the scripts print it: the GPU's name, or the CPU threads torch uses."""
    detail = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    return f"{device} ({detail})"
