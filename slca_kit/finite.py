"""Non-finite checks for every stage that optimises or reports numbers: one ``TrainingDiverged`` line naming the
stage, task, epoch and step, raised before anything from the diverged task is saved (docs/reliability.md)."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch.nn.utils import get_total_norm

from .errors import TrainingDiverged

KEPT = "the last finished task's checkpoint is kept"


def _where(stage: str, task: int, epoch: int | None, step: int | None) -> str:
    parts = [f"task {task}"] + ([f"epoch {epoch}"] if epoch is not None else []) + (
        [f"step {step}"] if step is not None else [])
    return f"{stage}: {', '.join(parts)}"


def _first_bad(tensor: torch.Tensor) -> float:
    return tensor.detach().flatten()[~torch.isfinite(tensor.detach().flatten())][0].item()


def ensure_finite_loss(loss: torch.Tensor, stage: str, task: int, epoch: int | None = None,
                       step: int | None = None, hint: str = "") -> float:
    """The value of a scalar loss; raise when it is NaN or infinite. One read of the value (one device sync, which
    logging the loss needs anyway) instead of a check and a read."""
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingDiverged(f"{_where(stage, task, epoch, step)}: loss is {value}; {KEPT}{hint}")
    return value


def ensure_finite_tensors(named: Iterable[tuple[str, Any]], what: str, stage: str, task: int,
                          epoch: int | None = None, step: int | None = None, hint: str = "") -> None:
    """Raise naming the first of ``named`` (name, tensor) pairs with a NaN or infinite entry."""
    named = [(name, tensor) for name, tensor in named
             if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel()]
    # One fused max-abs over all tensors (NaN and inf propagate through it; a finite maximum cannot overflow) and
    # one read of it; the tensors one by one only to name the bad one.
    if not named or math.isfinite(get_total_norm([tensor.detach() for _, tensor in named], math.inf).item()):
        return
    for name, tensor in named:
        if not torch.isfinite(tensor).all():
            count = int((~torch.isfinite(tensor)).sum())
            raise TrainingDiverged(f"{_where(stage, task, epoch, step)}: {what} {name} has {count} non-finite "
                                   f"values (first {_first_bad(tensor)}); {KEPT}{hint}")


def flat_tensors(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) for every tensor in nested dicts / lists (a method's ``state_dict``)."""
    if isinstance(tree, torch.Tensor):
        return [(prefix or "value", tree)]
    if isinstance(tree, dict):
        return [pair for key, value in tree.items() for pair in flat_tensors(value, f"{prefix}.{key}" if prefix
                                                                                  else str(key))]
    if isinstance(tree, (list, tuple)):
        return [pair for index, value in enumerate(tree) for pair in flat_tensors(value, f"{prefix}[{index}]")]
    return []
