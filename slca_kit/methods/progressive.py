"""Progressive Neural Networks (Rusu et al. 2016) on the frozen pretrained ViT (lifelong_methods.md, 2).

Each task adds a column whose layers also receive the previous layer's outputs of every earlier column through
lateral connections (the paper's Eq. 1, linear laterals U); earlier columns and the backbone are frozen. Two kinds
of column (``column``):

- ``mlp``: an MLP on the backbone's features ending in the task's output layer (which also has laterals). The
  columns replace the model's head.
- ``adapter``: a bottleneck adapter in every block's MLP of the unmodified timm ViT (a forward hook adds
  up(relu(down(x) + laterals)) to the MLP's output), with laterals from earlier columns' bottlenecks at the
  previous block. Column c is one pass of the ViT with column c's adapters; the task's head reads that pass's
  features. Task t costs t + 1 passes (the earlier ones without gradients).

Column t's logits depend only on columns 0..t, so a task id picks its column exactly (task-incremental);
class-incremental prediction takes the argmax over all columns' concatenated logits. The trainer's forward (and
DDP) stays the single entry point. Parameters added per task are reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..models.heads import IncrementalHead
from .base import Method, TaskContext, require_positive


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


class AdapterColumns(nn.Module):
    """Per-column bottleneck adapters in every block's MLP, attached with forward hooks; ``active`` picks the
    column of the pass running now, ``hidden[j][l]`` keeps column j's bottleneck at block l for the laterals."""

    def __init__(self, blocks: nn.ModuleList, dim: int, rank: int):
        super().__init__()
        self.dim, self.rank, self.depth = dim, rank, len(blocks)
        self.down = nn.ModuleList()  # [column][block] Linear(dim, rank)
        self.up = nn.ModuleList()  # [column][block] Linear(rank, dim), zero init: a new column starts as the ViT
        self.laterals = nn.ModuleList()  # [column][block - 1][earlier column] Linear(rank, rank)
        self.active: int | None = None
        self.hidden: list[list[torch.Tensor]] = []
        self._hooks = [block.mlp.register_forward_hook(self._hook(l)) for l, block in enumerate(blocks)]

    def add_column(self) -> None:
        earlier = len(self.down)
        self.down.append(nn.ModuleList(nn.Linear(self.dim, self.rank) for _ in range(self.depth)))
        up = nn.ModuleList(nn.Linear(self.rank, self.dim) for _ in range(self.depth))
        for layer in up:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.up.append(up)
        self.laterals.append(nn.ModuleList(
            nn.ModuleList(nn.Linear(self.rank, self.rank, bias=False) for _ in range(earlier))
            for _ in range(self.depth - 1)))

    def _hook(self, block: int):
        def add_adapter(module, inputs, output):
            column = self.active
            if column is None:
                return output
            pre = self.down[column][block](inputs[0])
            if block > 0:
                for j, lateral in enumerate(self.laterals[column][block - 1]):
                    pre = pre + lateral(self.hidden[j][block - 1])
            hidden = torch.relu(pre)
            self.hidden[column].append(hidden)
            return output + self.up[column][block](hidden)

        return add_adapter

    def column_features(self, backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """[batch, columns, features]: one backbone pass per column; only the last column gets gradients."""
        self.hidden, features = [], []
        try:
            for column in range(len(self.down)):
                self.active = column
                self.hidden.append([])
                with torch.set_grad_enabled(torch.is_grad_enabled() and column == len(self.down) - 1):
                    features.append(backbone(images))
        finally:
            self.active, self.hidden = None, []
        return torch.stack(features, dim=1)


class ColumnHeads(IncrementalHead):
    """Head t reads column t's features ([batch, columns, features] input)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(features[:, t]) for t, head in enumerate(self.heads)], dim=1)


class ProgressiveNetworks(Method):
    name = "pnn"
    needs_task_id = True

    @classmethod
    def backbone_sources(cls, params) -> tuple[str, ...]:
        # adapter columns hook timm's blocks[i].mlp; mlp columns need only the features
        return ("timm",) if params.column == "adapter" else ("timm", "transformers")

    @dataclass
    class Params:
        column: str = "mlp"  # mlp | adapter
        # mlp columns: widths (our choice: two hidden layers like the paper's MLP columns, for 192-768-d features)
        hidden: list[int] = field(default_factory=lambda: [512, 512])
        # adapter columns: bottleneck width, AdaptFormer's --ffn_num 64 (ShoufaChen/AdaptFormer main_image.py:114);
        # PNN itself has no released code, the columns follow the paper (Rusu et al. 2016)
        adapter_rank: int = 64

        def __post_init__(self):
            require_positive(self, "adapter_rank")
            if self.column not in ("mlp", "adapter"):
                raise ConfigError(f"method.params.column: {self.column!r} is not one of mlp, adapter")

    def grow(self, model, ctx: TaskContext) -> None:
        """Turn the model's head into columns (first call) and add task ``ctx.task``'s column."""
        device = next(model.backbone.parameters()).device
        if self.params.column == "mlp":
            if not isinstance(model.head, ProgressiveHead):
                head = ProgressiveHead(model.head.in_features, self.params.hidden)
                for size in model.head.task_sizes:
                    head.add_task(size)
                model.head = head.to(device)
            return
        if not isinstance(model.head, ColumnHeads):
            heads = ColumnHeads(model.head.in_features)
            heads.heads = model.head.heads
            model.head = heads
            model.columns = AdapterColumns(model.backbone.blocks, model.backbone.embed_dim, self.params.adapter_rank)
            columns = model.columns
            model.feature_fn = lambda images: columns.column_features(model.backbone, images)
        while len(model.columns.down) <= ctx.task:
            model.columns.add_column()
        model.columns.to(device)

    def before_task(self, model, ctx: TaskContext) -> None:
        model.backbone.requires_grad_(False)
        for index, column in enumerate(model.head.heads):
            column.requires_grad_(index == ctx.task)
        if self.params.column == "adapter":
            for parts in (model.columns.down, model.columns.up, model.columns.laterals):
                for index, column in enumerate(parts):
                    column.requires_grad_(index == ctx.task)

    def task_summary(self, model, ctx: TaskContext) -> dict:
        if self.params.column == "mlp":
            sizes = [sum(p.numel() for p in column.parameters()) for column in model.head.heads]
        else:
            columns = model.columns
            parts = [(columns.down[c], columns.up[c], columns.laterals[c], model.head.heads[c])
                     for c in range(len(columns.down))]
            sizes = [sum(p.numel() for part in column for p in part.parameters()) for column in parts]
        return {"column_parameters": sizes, "total_column_parameters": sum(sizes)}
