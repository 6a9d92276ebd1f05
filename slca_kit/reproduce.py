"""``slca reproduce TABLE``: run (or collect) every cell's packaged recipe over class-order seeds and set ours next
to the published number (``recipes/published.csv``), with the difference, the tolerance verdict and provenance
disagreements between a cell's runs. Runs live in ``OUTPUT/runs/BENCHMARK/METHOD_seedS``; a missing or incomplete
run is reported as such, never as a number (docs/reproduce.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .io import read_json, write_json_atomic, write_text_atomic
from .published import METRIC_NAMES, Target, load_targets
from .report import mean_std

DEFAULT_SEEDS = (1993, 1996, 1997)  # the SLCA paper's class-order seeds (slca.md)
# Provenance that must agree between the seeds of one cell for their mean to mean anything.
AGREEING = (("backbone", "timm_name"), ("backbone", "file_sha256"), ("backbone", "transformers_name"),
            ("backbone", "files_sha256"), ("backbone", "revision"), ("data", "train_fingerprint"),
            ("data", "test_fingerprint"), ("slca_kit",), ("git_commit",), ("mixed_precision",))


def select_targets(table: str, benchmarks: list[str] | None, methods: list[str] | None) -> list[Target]:
    targets = load_targets()
    tables = sorted({t.table for t in targets})
    if table not in tables:
        raise ConfigError(f"reproduce: unknown table {table!r}; tables: {', '.join(tables)}")
    chosen = [t for t in targets if t.table == table and (not benchmarks or t.benchmark in benchmarks)
              and (not methods or t.method in methods)]
    if not chosen:
        raise ConfigError(f"reproduce {table}: no cell for benchmarks {benchmarks or 'any'} and methods "
                          f"{methods or 'any'}; `slca list` shows the cells")
    return chosen


def run_location(output: Path, target: Target, seed: int) -> tuple[str, str]:
    """(output_dir, name) overrides of one seed's run of a cell's recipe."""
    benchmark, method = target.recipe.split("/")
    return str(output / "runs" / benchmark), f"{method}_seed{seed}"


def recipes_of(targets: list[Target]) -> list[Target]:
    """One target per recipe (cells of one recipe share its runs), in table order."""
    seen: dict[str, Target] = {}
    for target in targets:
        seen.setdefault(target.recipe, target)
    return list(seen.values())


def estimate(target: Target, overrides: list[str], output: Path, seeds: list[int]) -> str:
    """What one recipe's runs will cost: tasks x epochs, optimizer steps when the training set is a local .npz,
    and the measured seconds of a finished run of it in ``output`` if there is one."""
    import zipfile

    import numpy as np

    from .recipe_files import find_recipe
    from .resolve import load_config

    config = load_config(find_recipe(target.recipe), overrides)
    text = f"{len(seeds)} runs; each {config.train.epochs} epochs per task"
    if config.data.source == "arrays" and zipfile.is_zipfile(config.data.path):
        with np.load(config.data.path) as arrays:
            images = len(arrays[config.data.array_keys["train_y"]])
        per_class = config.data.max_train_per_class
        text += (f", about {config.train.epochs * images // config.train.batch_size} optimizer steps over all tasks"
                 if per_class is None else "")
    for seed in seeds:
        output_dir, name = run_location(output, target, seed)
        path = Path(output_dir) / name / "results.json"
        if path.is_file() and read_json(path).get("complete"):
            seconds = sum(sum(task["seconds"].values()) for task in read_json(path)["tasks"])
            return text + f"; a finished run here took {seconds / 60:.1f} min"
    return text


@dataclass
class Cell:
    target: Target
    seeds: list[int]
    values: list[float] = field(default_factory=list)  # ours, from complete runs only
    missing: list[str] = field(default_factory=list)  # "seed 1996: incomplete (3/10 tasks)" / "not run"
    provenance_differs: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and bool(self.values)

    def summary(self) -> dict:
        mean, std = mean_std(self.values) if self.complete else (None, None)
        difference = None if mean is None else mean - self.target.value
        return {"table": self.target.table, "benchmark": self.target.benchmark, "method": self.target.method,
                "recipe": self.target.recipe, "metric": self.target.metric, "paper": self.target.paper,
                "paper_value": self.target.value, "paper_std": self.target.std, "tolerance": self.target.tolerance,
                "seeds": self.seeds, "ours": self.values if self.complete else None, "ours_mean": mean,
                "ours_std": std, "difference": difference,
                "within_tolerance": None if difference is None else abs(difference) <= self.target.tolerance,
                "missing": self.missing, "provenance_differs": self.provenance_differs,
                "source": self.target.source}


def _field(provenance: dict, path: tuple[str, ...]):
    for part in path:
        provenance = provenance.get(part) if isinstance(provenance, dict) else None
    return provenance


def collect(targets: list[Target], seeds: list[int], output: Path) -> list[Cell]:
    """Each cell's values from its runs' results.json; missing and incomplete runs and provenance disagreements
    are listed instead of numbers."""
    cells = []
    for target in targets:
        cell = Cell(target, list(seeds))
        provenances = []
        for seed in seeds:
            output_dir, name = run_location(output, target, seed)
            path = Path(output_dir) / name / "results.json"
            if not path.is_file():
                cell.missing.append(f"seed {seed}: not run")
                continue
            results = read_json(path)
            if not results.get("complete"):
                cell.missing.append(f"seed {seed}: incomplete ({len(results.get('accuracy_matrix', []))}/"
                                    f"{len(results.get('task_sizes', []))} tasks)")
                continue
            cell.values.append(float(results[target.metric]))
            provenances.append(results.get("provenance", {}))
        for path_ in AGREEING:
            if len({repr(_field(p, path_)) for p in provenances}) > 1:
                cell.provenance_differs.append(".".join(path_))
        cells.append(cell)
    return cells


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown(cells: list[Cell]) -> str:
    lines = ["| cell | metric | paper | ours (seeds) | difference | within tolerance |", "|---|---|---|---|---|---|"]
    for cell in cells:
        row = cell.summary()
        if cell.complete:
            ours = f"{_fmt(row['ours_mean'], row['ours_std'])} ({len(cell.values)})"
            verdict = f"{'yes' if row['within_tolerance'] else 'no'} (±{row['tolerance']:g})"
            difference = f"{row['difference']:+.2f}"
        else:
            ours, difference, verdict = "missing: " + "; ".join(cell.missing), "-", "-"
        if cell.provenance_differs:
            verdict += f"; runs differ in {', '.join(cell.provenance_differs)}"
        lines.append(f"| {cell.target.recipe} | {METRIC_NAMES[cell.target.metric]}-Acc | "
                     f"{_fmt(cell.target.value, cell.target.std)} | {ours} | {difference} | {verdict} |")
    return "\n".join(lines)


def plot(cells: list[Cell], path: Path) -> None:
    """Bars of paper vs ours (mean, error bar = std) per cell; cells without complete runs show only the paper."""
    from .report import plt, save_figure  # report selects the file-only Agg backend

    labels = [f"{c.target.recipe}\n{METRIC_NAMES[c.target.metric]}" for c in cells]
    rows = [c.summary() for c in cells]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(cells)), 4.5))
    positions = range(len(cells))
    axes.bar([p - 0.2 for p in positions], [r["paper_value"] for r in rows], 0.4,
             yerr=[r["paper_std"] or 0 for r in rows], label="published", color="#999999", capsize=3)
    axes.bar([p + 0.2 for p in positions], [r["ours_mean"] or 0 for r in rows], 0.4,
             yerr=[r["ours_std"] or 0 for r in rows], label="ours (mean ± std over seeds)", color="#3b75af",
             capsize=3)
    for position, row in zip(positions, rows):
        if row["ours_mean"] is None:
            axes.text(position + 0.2, 1, "missing", rotation=90, ha="center", va="bottom", fontsize=7)
    axes.set_xticks(list(positions))
    axes.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    save_figure(figure, path)


def write_outputs(cells: list[Cell], output: Path, table: str) -> str:
    text = markdown(cells)
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output / "reproduce.md", f"# slca reproduce {table}\n\n{text}\n")
    write_json_atomic(output / "reproduce.json", {"table": table, "cells": [c.summary() for c in cells]})
    plot(cells, output / "reproduce.png")
    return text
