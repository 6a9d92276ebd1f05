"""One self-contained HTML page per run (``RUN_DIR/report.html``) and per comparison (``OUTPUT/comparison.html``):
plots embedded as base64 PNG, tables, the recipe and the provenance; no script, no link to fetch, viewable offline."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import yaml

from .report import COMPARISON_HEADER, SEED_HEADER, comparison_rows, format_value, seed_rows

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.summary td{text-align:left}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em}
img{max-width:100%;margin:.5em 1em .5em 0;vertical-align:top}"""


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def _matrix_rows(matrix: list[list[float | None]]) -> list[list[object]]:
    return [[i] + ["" if v is None else f"{v:.2f}" for v in row] for i, row in enumerate(matrix)]



def run_page(run_dir: Path, results: dict) -> str:
    config = results.get("config", {})
    n = len(results["accuracy_matrix"])
    status = "complete" if results["complete"] else f"incomplete: {n} of {len(results['task_sizes'])} tasks"
    data, backbone = config.get("data", {}), config.get("backbone", {})
    summary = [
        ["method", results["method"]],
        ["data", data.get("benchmark") or data.get("source", "")],
        ["backbone", f"{backbone.get('name', '')} ({backbone.get('source', 'timm')})"],
        ["tasks", f"{list(results['task_sizes'])} ({status})"],
        ["Last-Acc / Inc-Acc", f"{format_value(results['last_acc'])} / {format_value(results['inc_acc'])}"],
        ["forgetting / BWT", f"{format_value(results.get('forgetting'))} / {format_value(results.get('bwt'))}"],
    ]
    pairs = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary)
    body = [f'<table class="summary">{pairs}</table>', "<h2>Accuracy</h2>",
            _image(run_dir / "accuracy_matrix.png", "accuracy matrix"),
            _image(run_dir / "accuracy_curve.png", "accuracy on seen classes"),
            _image(run_dir / "accuracy_matrix_task_incremental.png", "task-incremental accuracy matrix"),
            "<p>Accuracy (%) after training task i (rows) on the test images of task j (columns):</p>",
            _table(["after task"] + [f"task {j}" for j in range(n)], _matrix_rows(results["accuracy_matrix"]))]
    records = results.get("tasks", [])
    if records:
        stages = sorted({stage for record in records for stage in record.get("seconds", {})})
        rows = [[record["task"], record["classes"], f"{record['seen_accuracy']:.2f}"]
                + [f"{record['seconds'].get(stage, 0):.1f}" for stage in stages]
                + [record.get("peak_memory_mib", "")] for record in records]
        body += ["<h2>Tasks</h2>", _table(["task", "classes seen", "accuracy on seen (%)"]
                                          + [f"{stage} (s)" for stage in stages] + ["peak memory (MiB)"], rows)]
    body += ["<h2>Recipe</h2>", f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>",
             "<h2>Provenance</h2>", f"<pre>{html.escape(json.dumps(results.get('provenance', {}), indent=2))}</pre>"]
    return _page(f"{results['name']}: {results['method']}", "\n".join(part for part in body if part))


def comparison_page(runs: list[dict], seed_groups: list[list[dict]], curve: Path) -> str:
    body = [_table(COMPARISON_HEADER, comparison_rows(runs)), _image(curve, "accuracy on seen classes, all runs")]
    if seed_groups:
        body += ["<h2>Mean ± std (n - 1) over class-order seeds</h2>", _table(SEED_HEADER, seed_rows(seed_groups))]
    for results in runs:
        body += [f"<h2>{html.escape(results['name'])}</h2>",
                 _table(["after task"] + [f"task {j}" for j in range(len(results["accuracy_matrix"]))],
                        _matrix_rows(results["accuracy_matrix"]))]
    return _page(f"Comparison of {len(runs)} runs", "\n".join(part for part in body if part))
