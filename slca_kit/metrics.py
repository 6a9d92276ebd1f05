"""Class-incremental metrics from per-task correct counts (docs/metrics.md gives the formulas).

``correct[i][j]`` = test samples of task j's classes predicted correctly after training task i (argmax over all
classes seen so far), ``totals[j]`` = test samples of task j. Accuracies are percentages.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AccuracyMatrix:
    totals: list[int] = field(default_factory=list)
    correct: list[list[int]] = field(default_factory=list)

    def add_row(self, correct: list[int], totals: list[int]) -> None:
        if len(correct) != len(self.correct) + 1 or len(totals) != len(correct):
            raise ValueError(f"row {len(self.correct)} needs {len(self.correct) + 1} task counts, got {len(correct)}")
        if self.totals and totals[:len(self.totals)] != self.totals:
            raise ValueError(f"test-set sizes changed between rows: {self.totals} vs {totals}")
        self.totals = list(totals)
        self.correct.append(list(correct))

    @property
    def num_rows(self) -> int:
        return len(self.correct)

    def accuracy(self, i: int, j: int) -> float:
        """a[i][j]: accuracy on task j's classes after task i (j <= i)."""
        return 100.0 * self.correct[i][j] / self.totals[j]

    def matrix(self) -> list[list[float | None]]:
        n = self.num_rows
        return [[self.accuracy(i, j) if j <= i else None for j in range(n)] for i in range(n)]

    def seen_accuracy(self, i: int) -> float:
        """Top-1 over all test samples of the classes seen after task i."""
        return 100.0 * sum(self.correct[i][: i + 1]) / sum(self.totals[: i + 1])

    def last_acc(self) -> float:
        return self.seen_accuracy(self.num_rows - 1)

    def inc_acc(self) -> float:
        """Mean over tasks of the accuracy on the classes seen so far."""
        return sum(self.seen_accuracy(i) for i in range(self.num_rows)) / self.num_rows

    def forgetting(self) -> float | None:
        """Mean over old tasks j of max_{j <= l < last} a[l][j] - a[last][j] (Chaudhry et al. 2018)."""
        last = self.num_rows - 1
        if last == 0:
            return None
        drops = [max(self.accuracy(l, j) for l in range(j, last)) - self.accuracy(last, j) for j in range(last)]
        return sum(drops) / len(drops)

    def bwt(self) -> float | None:
        """Backward transfer: mean over old tasks j of a[last][j] - a[j][j] (Lopez-Paz & Ranzato 2017)."""
        last = self.num_rows - 1
        if last == 0:
            return None
        return sum(self.accuracy(last, j) - self.accuracy(j, j) for j in range(last)) / last

    def old_new(self, i: int) -> dict[str, float | None]:
        """After task i: accuracy on earlier tasks' classes and on task i's classes."""
        old_total = sum(self.totals[:i])
        old = 100.0 * sum(self.correct[i][:i]) / old_total if old_total else None
        return {"old": old, "new": self.accuracy(i, i)}

    def summary(self) -> dict:
        return {
            "last_acc": self.last_acc(),
            "inc_acc": self.inc_acc(),
            "forgetting": self.forgetting(),
            "bwt": self.bwt(),
            "seen_accuracy": [self.seen_accuracy(i) for i in range(self.num_rows)],
            "old_new": [self.old_new(i) for i in range(self.num_rows)],
            "accuracy_matrix": self.matrix(),
            "correct": self.correct,
            "totals": self.totals,
        }

    def state_dict(self) -> dict:
        return {"totals": self.totals, "correct": self.correct}

    @classmethod
    def from_state_dict(cls, state: dict) -> "AccuracyMatrix":
        return cls(list(state["totals"]), [list(row) for row in state["correct"]])
