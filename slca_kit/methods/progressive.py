"""Progressive Neural Networks (Rusu et al. 2016) on the frozen pretrained ViT (lifelong_methods.md, 2).

Each task adds a column: an MLP on the backbone's features whose layers also receive the previous layer's outputs
of every earlier column through lateral connections (the paper's Eq. 1, linear laterals U), ending in the task's
output layer (which also has laterals). Earlier columns are frozen; the backbone is frozen. Column t's logits
depend only on columns 0..t, so a task id picks its column exactly (task-incremental); class-incremental
prediction takes the argmax over all columns' concatenated logits. The columns replace the model's head, so the
trainer's forward (and DDP) stays the single entry point. Parameters added per task are reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .base import Method, TaskContext


class Column(nn.Module):
    """One column: hidden layers over the shared input, laterals from ``earlier`` columns, an output layer."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, earlier: int):
        super().__init__()
        widths = [in_features] + hidden
        self.layers = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(len(hidden)))
        self.output = nn.Linear(widths[-1], num_classes)
        # laterals[l][j]: column j's output of layer l-1 into this column's layer l (l >= 1; layer 0 shares x);
        # the last entry feeds the output layer from the earlier columns' last hidden layer.
        self.laterals = nn.ModuleList(
            nn.ModuleList(nn.Linear(widths[l], widths[l + 1] if l < len(hidden) else num_classes, bias=False)
                          for _ in range(earlier))
            for l in range(1, len(hidden) + 1))

    def forward(self, x: torch.Tensor, earlier_hidden: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list]:
        """``earlier_hidden[j][l]``: column j's output of hidden layer l. Returns logits and this column's."""
        hidden, h = [], x
        for l, layer in enumerate(self.layers):
            pre = layer(h)
            if l > 0:
                pre = pre + sum(lateral(earlier_hidden[j][l - 1]) for j, lateral in enumerate(self.laterals[l - 1]))
            h = torch.relu(pre)
            hidden.append(h)
        logits = self.output(h)
        if earlier_hidden:
            logits = logits + sum(lateral(earlier_hidden[j][-1]) for j, lateral in enumerate(self.laterals[-1]))
        return logits, hidden


class ProgressiveHead(nn.Module):
    """The model's head for PNN: one column per task (same interface as ``IncrementalHead``)."""

    def __init__(self, in_features: int, hidden: list[int]):
        super().__init__()
        self.in_features, self.hidden = in_features, list(hidden)
        self.heads = nn.ModuleList()  # the columns

    def add_task(self, num_classes: int) -> Column:
        column = Column(self.in_features, self.hidden, num_classes, earlier=len(self.heads))
        self.heads.append(column)
        return column

    @property
    def task_sizes(self) -> list[int]:
        return [column.output.out_features for column in self.heads]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        outputs, hidden = [], []
        for column in self.heads:
            logits, column_hidden = column(features, hidden)
            outputs.append(logits)
            hidden.append(column_hidden)
        return torch.cat(outputs, dim=1)


class ProgressiveNetworks(Method):
    name = "pnn"
    needs_task_id = True

    @dataclass
    class Params:
        # Column widths (our choice: two hidden layers like the paper's MLP columns, sized for 192-768-d features).
        hidden: list[int] = field(default_factory=lambda: [512, 512])

    def grow(self, model, ctx: TaskContext) -> None:
        """The first call swaps the trainer's linear head for columns; later calls find the column just added."""
        if isinstance(model.head, ProgressiveHead):
            return
        sizes = model.head.task_sizes
        head = ProgressiveHead(model.head.in_features, self.params.hidden)
        for size in sizes:
            head.add_task(size)
        model.head = head.to(next(model.backbone.parameters()).device)

    def before_task(self, model, ctx: TaskContext) -> None:
        model.backbone.requires_grad_(False)
        for index, column in enumerate(model.head.heads):
            column.requires_grad_(index == ctx.task)

    def task_summary(self, model, ctx: TaskContext) -> dict:
        sizes = [sum(p.numel() for p in column.parameters()) for column in model.head.heads]
        return {"column_parameters": sizes, "total_column_parameters": sum(sizes)}
