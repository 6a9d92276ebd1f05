"""Class-incremental scenarios: the reference class order and B{init}-Inc{increment} task splits."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ScenarioConfig
from ..errors import ConfigError


def reference_class_order(num_classes: int, seed: int | None) -> list[int]:
    """``np.random.seed(seed); np.random.permutation(n)`` as in the reference (slca.md), without touching the
    global NumPy state: a fresh legacy RandomState draws the identical permutation. ``None`` keeps 0..n-1."""
    if seed is None:
        return list(range(num_classes))
    return np.random.RandomState(seed).permutation(num_classes).tolist()


def task_sizes_for(num_classes: int, init_classes: int | None, increment: int,
                   remainder: str = "separate") -> list[int]:
    """B{init}-Inc{increment}: the first task has ``init`` classes (``increment`` if None), then ``increment``
    each; leftover classes form a smaller last task (``separate``, Cars-196: 9 x 20 + 16) or join the last
    task (``merge``, Flowers-102: 9 x 10 + 12)."""
    first = increment if init_classes is None else init_classes
    if first > num_classes:
        raise ConfigError(f"scenario.init_classes: {first} exceeds the {num_classes} classes in the data")
    sizes = [first]
    remaining = num_classes - first
    while remaining > 0:
        sizes.append(min(increment, remaining))
        remaining -= sizes[-1]
    if remainder == "merge" and len(sizes) > 1 and sizes[-1] < increment:
        leftover = sizes.pop()
        sizes[-1] += leftover
    return sizes


@dataclass(frozen=True)
class Scenario:
    class_order: tuple[int, ...]  # original label of each new (ordered) label
    task_sizes: tuple[int, ...]

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    def task_offset(self, task: int) -> int:
        return sum(self.task_sizes[:task])

    def task_classes(self, task: int) -> list[int]:
        """New (remapped) labels of ``task``'s classes."""
        start = self.task_offset(task)
        return list(range(start, start + self.task_sizes[task]))

    def seen_classes(self, task: int) -> int:
        """Number of classes seen after finishing ``task``."""
        return self.task_offset(task + 1)

    def class_task_ids(self) -> np.ndarray:
        """Each remapped class's real task id (not ``c // task_size``: see the reference bug in slca.md)."""
        return np.repeat(np.arange(self.num_tasks), self.task_sizes)

    def label_map(self) -> np.ndarray:
        """Array mapping an original label to its position in the class order."""
        mapping = np.empty(self.num_classes, dtype=np.int64)
        mapping[list(self.class_order)] = np.arange(self.num_classes)
        return mapping


def build_scenario(cfg: ScenarioConfig, num_classes: int) -> Scenario:
    sizes = task_sizes_for(num_classes, cfg.init_classes, cfg.increment, cfg.remainder)
    if cfg.num_tasks is not None and cfg.num_tasks != len(sizes):
        raise ConfigError(
            f"scenario.num_tasks: {cfg.num_tasks} declared, but {num_classes} classes with init_classes="
            f"{cfg.init_classes}, increment={cfg.increment} and remainder={cfg.remainder!r} give {len(sizes)} tasks "
            f"{sizes}"
        )
    return Scenario(tuple(reference_class_order(num_classes, cfg.class_order_seed)), tuple(sizes))
