"""Published numbers as data (``slca_kit/recipes/published.csv``): one row per table cell with its paper, table,
protocol (backbone, split, task layout), benchmark, method, the recipe that reproduces it, metric, value, std,
tolerance and source. ``slca list`` shows them next to the recipes; docs/recipes.md explains the tables."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources

METRIC_NAMES = {"last_acc": "Last", "inc_acc": "Inc"}


@dataclass(frozen=True)
class Target:
    table: str  # the name `slca reproduce TABLE` takes: slca_table1, method_papers, proxy
    paper: str
    paper_table: str
    backbone: str
    split: str
    layout: str
    benchmark: str
    method: str
    recipe: str  # packaged recipe name, e.g. cifar100/slca
    metric: str  # last_acc | inc_acc
    value: float
    std: float | None
    tolerance: float  # |ours - value| within this counts as reproduced
    source: str

    def describe(self) -> str:
        spread = f"±{self.std:g}" if self.std is not None else ""
        return f"{METRIC_NAMES[self.metric]} {self.value:g}{spread}"


def load_targets() -> list[Target]:
    text = (resources.files("slca_kit") / "recipes" / "published.csv").read_text(encoding="utf-8")
    rows = csv.DictReader(text.splitlines())
    return [Target(**{**row, "value": float(row["value"]), "std": float(row["std"]) if row["std"] else None,
                      "tolerance": float(row["tolerance"])}) for row in rows]


def targets_by_recipe() -> dict[str, list[Target]]:
    grouped: dict[str, list[Target]] = {}
    for target in load_targets():
        grouped.setdefault(target.recipe, []).append(target)
    return grouped
