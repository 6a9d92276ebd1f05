"""Evaluation on the test split after each task: class-incremental (argmax over every seen class) and, for methods
that can use a task id, task-incremental. Counts are summed over processes, so DDP gives the single-process numbers.

A method classifies each test image on its own unless it declares an ``evaluation_batch``: then, as the official
code of batch-wise prompt selection does, each task's test images are evaluated separately in consecutive batches of
that size, and whole batches are shared out over processes. Either way the accuracy depends neither on
``train.eval_batch_size`` nor on the number of processes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data.task_data import TaskDataset
from .errors import TrainingDiverged
from .finite import KEPT
from .preemption import ignore_stop_signals

if TYPE_CHECKING:  # imported for type hints only
    from accelerate import Accelerator

    from .config import Config
    from .data.scenario import Scenario
    from .data.sources import ImageSplit
    from .methods import Method, TaskContext


def per_task_batches(size: int, batch: int, rank: int, world: int) -> list[list[int]]:
    """Consecutive batches of ``batch`` indices of a ``size``-image test set (the last may be shorter), every
    ``world``-th batch to process ``rank``: the batches, and so batch-dependent predictions, are the same for any
    number of processes."""
    starts = range(0, size, batch)
    return [list(range(start, min(start + batch, size))) for start in list(starts)[rank::world]]


def unusable_rows(logits: torch.Tensor) -> torch.Tensor:
    """Rows with a NaN or +inf logit, or no finite one. -inf alone is a valid "not this class" (PackNet, PNN and
    DEN give -inf to the classes of the tasks they did not route an image to)."""
    return torch.isnan(logits).any(dim=1) | torch.isposinf(logits).any(dim=1) | ~torch.isfinite(logits).any(dim=1)


class Evaluator:
    """``shard`` (dataset -> this process's share) and ``reduce_sum`` (tensor -> sum over processes) are the
    trainer's, so that evaluation and training share out and add up samples the same way."""

    def __init__(self, test: "ImageSplit", label_map: np.ndarray, transform, scenario: "Scenario",
                 method: "Method", accelerator: "Accelerator", config: "Config",
                 shard: Callable[[Dataset], Dataset], reduce_sum: Callable[[torch.Tensor], torch.Tensor]):
        self.test = test
        self.label_map = label_map
        self.transform = transform
        self.scenario = scenario
        self.method = method
        self.accelerator = accelerator
        self.config = config
        self.shard = shard
        self.reduce_sum = reduce_sum

    def protocol(self) -> dict:
        """How test images were batched, for results.json."""
        group = self.method.evaluation_batch()
        if group is None:
            return {"batching": "per-sample", "batch": None}
        return {"batching": "per-task batches (the prediction depends on the batch, evaluated as the official code "
                            "does: each task's test images in consecutive batches)", "batch": group}

    def batches(self, classes: list[int]):
        """This process's test batches of ``classes`` on the device. Per-sample methods: every num_processes-th
        image in batches of ``train.eval_batch_size`` (which cannot change a prediction). Methods with an
        ``evaluation_batch``: consecutive batches of that size, whole batches shared out over processes; the
        caller passes one task's classes at a time."""
        dataset = TaskDataset(self.test, self.label_map, classes, self.transform)
        workers = self.config.data.num_workers
        group = self.method.evaluation_batch()
        if group is None:
            loader = DataLoader(self.shard(dataset), batch_size=self.config.train.eval_batch_size,
                                num_workers=workers, worker_init_fn=ignore_stop_signals)
        else:
            batches = per_task_batches(len(dataset), group, self.accelerator.process_index,
                                       self.accelerator.num_processes)
            loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                worker_init_fn=ignore_stop_signals)
        for images, labels in loader:
            yield images.to(self.accelerator.device), labels.to(self.accelerator.device)

    @torch.no_grad()
    def class_incremental(self, model, ctx: "TaskContext") -> tuple[list[int], list[int]]:
        """Correct predictions and test samples per task over all seen classes (argmax over seen classes)."""
        device = self.accelerator.device
        seen, n_tasks = ctx.seen_classes, ctx.task + 1
        class_task = torch.as_tensor(self.scenario.class_task_ids(), device=device)
        correct = torch.zeros(n_tasks, dtype=torch.long, device=device)
        totals = torch.zeros(n_tasks, dtype=torch.long, device=device)
        non_finite = torch.zeros((), dtype=torch.long, device=device)
        model.eval()
        per_task = self.method.evaluation_batch() is not None
        class_sets = [self.scenario.task_classes(t) for t in range(n_tasks)] if per_task else [list(range(seen))]
        for classes in class_sets:
            for images, labels in self.batches(classes):
                with self.accelerator.autocast():
                    logits = self.method.predict(model, images, ctx)
                hits = logits[:, :seen].argmax(dim=1) == labels
                tasks = class_task[labels]
                correct += torch.bincount(tasks[hits], minlength=n_tasks)
                totals += torch.bincount(tasks, minlength=n_tasks)
                non_finite += unusable_rows(logits[:, :seen]).sum()
        self._ensure_finite(non_finite, "class-incremental", ctx)
        return self.reduce_sum(correct).tolist(), self.reduce_sum(totals).tolist()

    def _ensure_finite(self, non_finite: torch.Tensor, setting: str, ctx: "TaskContext") -> None:
        """Reduced over processes first, so every process raises together (none waits in a collective)."""
        count = int(self.reduce_sum(non_finite))
        if count:
            raise TrainingDiverged(f"evaluation ({setting}): task {ctx.task}: {count} test images have NaN or infinite "
                                   f"logits, so no accuracy is reported; {KEPT}")

    @torch.no_grad()
    def task_incremental(self, model, ctx: "TaskContext") -> tuple[list[int], list[int]]:
        """Correct predictions and test samples per task when each sample's task id is given: argmax of
        ``method.predict_task`` over its own task's classes."""
        device = self.accelerator.device
        correct = torch.zeros(ctx.task + 1, dtype=torch.long, device=device)
        totals = torch.zeros(ctx.task + 1, dtype=torch.long, device=device)
        non_finite = torch.zeros((), dtype=torch.long, device=device)
        model.eval()
        for task in range(ctx.task + 1):
            offset = self.scenario.task_offset(task)
            for images, labels in self.batches(self.scenario.task_classes(task)):
                with self.accelerator.autocast():
                    logits = self.method.predict_task(model, images, task, ctx)
                correct[task] += (logits.argmax(dim=1) == labels - offset).sum()
                totals[task] += labels.numel()
                non_finite += unusable_rows(logits).sum()
        self._ensure_finite(non_finite, "task-incremental", ctx)
        return self.reduce_sum(correct).tolist(), self.reduce_sum(totals).tolist()
