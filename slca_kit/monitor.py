"""What a run shows while it trains: a per-step progress bar (main process) and the numbers sent to the accelerate
trackers named in ``train.log_with`` (docs/metrics.md, Watching a run)."""
from __future__ import annotations

import time

from tqdm.auto import tqdm


def learning_rates(optimizer) -> dict[str, float]:
    """Each parameter group's current lr, by the group's name (head, backbone, adapter, ...)."""
    return {group.get("name", str(index)): float(group["lr"]) for index, group in enumerate(optimizer.param_groups)}


class EpochProgress:
    """One epoch's micro-batches: a bar with the epoch's running mean loss, each group's lr and images/s (over all
    processes), on the local main process only; ``mean_loss`` is what the trackers get at the epoch's end."""

    def __init__(self, steps: int, description: str, enabled: bool, processes: int, rates: dict[str, float]):
        self.bar = tqdm(total=steps, desc=description, disable=not enabled, leave=False, unit="step")
        self.processes = processes
        # schedules step per epoch: the epoch's learning rates, formatted once
        self.rates = "lr " + " ".join(f"{name} {rate:.2g}" for name, rate in rates.items())
        self.loss_sum = 0.0
        self.steps = 0
        self.images = 0
        self.start = time.perf_counter()

    def update(self, loss: float, batch_size: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.images += batch_size * self.processes
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"loss {self.mean_loss:.4f}  {self.rates}  {self.images / elapsed:.1f} img/s",
                                 refresh=False)
        self.bar.update(1)

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    def close(self) -> None:
        self.bar.refresh()  # the epoch's final numbers, even when it ran faster than tqdm redraws
        self.bar.close()


def epoch_metrics(mean_loss: float, rates: dict[str, float]) -> dict[str, float]:
    """Tracker values at an epoch's end."""
    return {"train/loss": mean_loss, **{f"train/lr/{name}": rate for name, rate in rates.items()}}


def task_metrics(record: dict, matrix) -> dict[str, float]:
    """Tracker values at a task's end (``matrix``: the ``AccuracyMatrix`` with this task's row): the row (accuracy
    on each task so far), the accuracy on all seen classes, Last-Acc / Inc-Acc so far and the stage timings."""
    task = matrix.num_rows - 1
    values = {"accuracy/seen": record["seen_accuracy"], "accuracy/last_acc": matrix.last_acc(),
              "accuracy/inc_acc": matrix.inc_acc()}
    values.update({f"accuracy/task_{j}": matrix.accuracy(task, j) for j in range(task + 1)})
    values.update({f"seconds/{stage}": seconds for stage, seconds in record["seconds"].items()})
    return values
