"""The embedded default job (``slca train`` with no recipe): SLCA next to sequential fine-tuning with and without
the slow learner, on the same pretrained ViT and the same 5 tasks of handwritten digits (recipes/demo/), then one
table and one comparison plot."""
from __future__ import annotations

from pathlib import Path

import yaml

from .config import Config
from .errors import ConfigError
from .io import read_json
from .recipe_files import find_recipe
from .run_folder import config_differences

DEMO_RECIPES = ("demo/slca", "demo/seq_ft_sl", "demo/seq_ft")


def demo_configs(overrides: list[str]) -> list[Config]:
    """The three demo runs, each with the user's ``key=value`` overrides."""
    from .resolve import load_config

    return [load_config(find_recipe(name), overrides) for name in DEMO_RECIPES]


def run_state(config: Config) -> str:
    """"complete" (same recipe, finished: reused), "started" (same recipe, resumable) or "new"; a folder that
    holds a run of other settings is refused rather than mixed into the comparison."""
    run_dir = Path(config.output_dir) / config.name
    stored = run_dir / "config.yaml"
    if not stored.is_file():
        return "new"
    changed = config_differences(yaml.safe_load(stored.read_text(encoding="utf-8")) or {}, config.to_dict())
    if changed:
        keys = ", ".join(list(changed)[:5])
        raise ConfigError(f"{run_dir} holds a demo run with other settings ({keys}); remove it or set "
                          "output_dir=... to run the demo elsewhere")
    results = run_dir / "results.json"
    return "complete" if results.is_file() and read_json(results).get("complete") else "started"


def first_task_accuracy(results: dict) -> float:
    """Accuracy on the first task's classes after the last task: what was kept of the oldest knowledge."""
    return results["accuracy_matrix"][-1][0]


def summary(run_dirs: list[Path], backbone_card: dict, output: Path) -> str:
    """The side-by-side table (written also as comparison.md / .html with comparison_curve.png under ``output``)."""
    from .report import markdown_table, report

    report(run_dirs, output)
    runs = [read_json(Path(run_dir) / "results.json") for run_dir in run_dirs]
    rows = [[r["method"], f"{r['last_acc']:.2f}", f"{r['inc_acc']:.2f}", f"{r['forgetting']:.2f}",
             f"{first_task_accuracy(r):.2f}"] for r in runs]
    table = markdown_table(["method", "Last-Acc", "Inc-Acc", "Forgetting", "first task at the end"], rows)
    accuracy = backbone_card.get("held_out_font_accuracy")
    backbone = (f"Backbone: a ViT pretrained on {len(backbone_card.get('glyphs', ''))} printed glyphs, "
                f"{accuracy:.1f}% on fonts it never saw (chance {backbone_card.get('chance_accuracy')}%); "
                if accuracy is not None else "Backbone: the recipe's weights; ")
    best = max(runs, key=lambda r: r["last_acc"])
    return (f"{backbone}then 5 tasks of 2 handwritten digits, classes it never saw.\n\n{table}\n\n"
            f"Best Last-Acc: {best['method']}. Accuracy on all classes seen so far after each task: "
            f"{output / 'comparison_curve.png'}; tables and plots: {output / 'comparison.html'}")
