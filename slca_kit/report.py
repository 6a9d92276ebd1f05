"""Run outputs a person can read: results.json, the accuracy matrix as CSV, PNG plots and an HTML page (html_report);
comparisons of runs."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_write, read_json, write_json_atomic, write_text_atomic  # noqa: E402


def matrix_csv(matrix: list[list[float | None]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["after_task"] + [f"task_{j}" for j in range(len(matrix))])
    for i, row in enumerate(matrix):
        writer.writerow([i] + ["" if value is None else f"{value:.2f}" for value in row])
    return buffer.getvalue()


def save_figure(figure, path: Path) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(figure)


def plot_matrix(results: dict, path: Path, setting: str = "class-incremental") -> None:
    matrix = results["accuracy_matrix"]
    n = len(matrix)
    values = [[float("nan") if v is None else v for v in row] for row in matrix]
    figure, axes = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.55 * n))
    image = axes.imshow(values, vmin=0, vmax=100, cmap="viridis")
    for i in range(n):
        for j in range(i + 1):
            axes.text(j, i, f"{values[i][j]:.0f}", ha="center", va="center", fontsize=7,
                      color="white" if values[i][j] < 60 else "black")
    axes.set_xlabel("evaluated on task")
    axes.set_ylabel("after training task")
    axes.set_xticks(range(n))
    axes.set_yticks(range(n))
    axes.set_title(f"{results['method']} ({setting}): accuracy (%)  Last {results['last_acc']:.1f}  "
                   f"Inc {results['inc_acc']:.1f}", fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.046)
    save_figure(figure, path)


def plot_curves(runs: list[dict], path: Path) -> None:
    """Accuracy on all seen classes after each task, one line per run."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for results in runs:
        classes = [record["classes"] for record in results["tasks"]]
        axes.plot(classes, results["seen_accuracy"], marker="o",
                  label=f"{results['name']} ({results['last_acc']:.1f})")
    axes.set_xlabel("classes seen")
    axes.set_ylabel("top-1 accuracy on seen classes (%)")
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    save_figure(figure, path)


def write_run_outputs(run_dir: Path, results: dict) -> None:
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / "results.json", results)
    write_text_atomic(run_dir / "accuracy_matrix.csv", matrix_csv(results["accuracy_matrix"]))
    plot_matrix(results, run_dir / "accuracy_matrix.png")
    plot_curves([results], run_dir / "accuracy_curve.png")
    task_incremental = results.get("task_incremental")
    if task_incremental:
        write_text_atomic(run_dir / "accuracy_matrix_task_incremental.csv",
                          matrix_csv(task_incremental["accuracy_matrix"]))
        plot_matrix({**results, **task_incremental}, run_dir / "accuracy_matrix_task_incremental.png",
                    setting="task-incremental")
    from .html_report import run_page  # it builds on this module's tables

    write_text_atomic(run_dir / "report.html", run_page(run_dir, results))


def format_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


COMPARISON_HEADER = ["run", "method", "setting", "tasks", "Last-Acc", "Inc-Acc", "Forgetting", "BWT"]
SEED_HEADER = ["runs", "method", "seeds", "Last-Acc", "Inc-Acc", "Forgetting", "BWT"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def comparison_rows(runs: list[dict]) -> list[list[str]]:
    """Last-Acc, Inc-Acc, forgetting and BWT; one row per run and evaluation setting (class-incremental for every
    run, task-incremental too for methods that use a task id at test)."""
    rows = []
    for r in runs:
        settings = [("class-incremental", r)]
        if r.get("task_incremental"):
            settings.append(("task-incremental", r["task_incremental"]))
        for setting, m in settings:
            rows.append([r["name"], r["method"], setting, f"{len(m['accuracy_matrix'])}/{len(r['task_sizes'])}",
                         *(format_value(m[key]) for key in ("last_acc", "inc_acc", "forgetting", "bwt"))])
    return rows


def comparison_table(runs: list[dict]) -> str:
    """Markdown table of ``comparison_rows``."""
    return markdown_table(COMPARISON_HEADER, comparison_rows(runs))


SEED_NEUTRAL = (("name",), ("output_dir",), ("scenario", "class_order_seed"))


def _without_seed(config: dict) -> str:
    """The config as a key that is equal for runs differing only in class-order seed (and name / folder)."""
    import copy
    import json

    config = copy.deepcopy(config)
    for path in SEED_NEUTRAL:
        node = config
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    return json.dumps(config, sort_keys=True, default=str)


def seed_groups(runs: list[dict]) -> list[list[dict]]:
    """Runs grouped by config up to the class-order seed, in first-appearance order."""
    groups: dict[str, list[dict]] = {}
    for results in runs:
        groups.setdefault(_without_seed(results["config"]), []).append(results)
    return list(groups.values())


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no std for a single value."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def _fmt_mean_std(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    mean, std = mean_std(present)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def seed_rows(groups: list[list[dict]]) -> list[list[str]]:
    """Mean ± std over seeds, one row per group of complete runs (class-incremental)."""
    rows = []
    for group in groups:
        seeds = [r["config"]["scenario"]["class_order_seed"] for r in group]
        rows.append([", ".join(r["name"] for r in group), group[0]["method"], ", ".join(str(s) for s in seeds)]
                    + [_fmt_mean_std([r[key] for r in group]) for key in ("last_acc", "inc_acc", "forgetting", "bwt")])
    return rows


def seed_table(groups: list[list[dict]]) -> str:
    """Markdown table of ``seed_rows``."""
    return markdown_table(SEED_HEADER, seed_rows(groups))


def report(run_dirs: list[Path], output: Path | None = None) -> str:
    """Re-create each run's plots; with several runs also a comparison curve and table under ``output``."""
    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: no results.json (is this a run folder?)")
        results = read_json(path)
        write_run_outputs(Path(run_dir), results)
        runs.append(results)
    table = comparison_table(runs)
    over_seeds = [group for group in seed_groups([r for r in runs if r["complete"]]) if len(group) > 1]
    if over_seeds:
        table += "\n\nMean ± std (n - 1) over class-order seeds of complete runs that differ only by seed:\n\n"
        table += seed_table(over_seeds)
    if output is not None:
        from .html_report import comparison_page

        output.mkdir(parents=True, exist_ok=True)
        plot_curves(runs, output / "comparison_curve.png")
        write_text_atomic(output / "comparison.md", table + "\n")
        page = comparison_page(runs, over_seeds, output / "comparison_curve.png")
        write_text_atomic(output / "comparison.html", page)
    return table
