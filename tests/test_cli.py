"""The command line end to end on the tiny synthetic set, in a subprocess like a user would run it."""
import json
import subprocess
import sys

import pytest

from conftest import run_cli_here, tiny_recipe, write_recipe


def _slca(*args, cwd):
    return subprocess.run([sys.executable, "-m", "slca_kit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_train_eval_report(tiny_npz, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_npz, tmp_path / "runs"))
    done = _slca("train", str(recipe), "train.epochs=1", "name=cli_run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "cli_run: Last-Acc" in done.stdout
    run_dir = tmp_path / "runs" / "cli_run"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["train"]["epochs"] == 1  # the override reached the resolved config

    evaluated = _slca("eval", str(run_dir), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    # evaluating the final checkpoint reproduces the run's last accuracy (aligned SLCA heads included)
    assert f"classes {results['last_acc']:.2f}%" in evaluated.stdout

    reported = _slca("report", str(run_dir), "--output", str(tmp_path / "cmp"), cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr
    assert f"| cli_run | slca | class-incremental | 3/3 | {results['last_acc']:.2f} |" in reported.stdout
    assert (tmp_path / "cmp" / "comparison_curve.png").stat().st_size > 0


def test_resume_flag_continues_a_finished_run(tiny_npz, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_npz, tmp_path / "runs"))
    assert _slca("train", str(recipe), "train.epochs=1", cwd=tmp_path).returncode == 0
    again = run_cli_here("train", str(recipe), "train.epochs=1")
    assert again.returncode == 2 and "pass --resume" in again.stderr
    resumed = run_cli_here("train", str(recipe), "train.epochs=1", "--resume")
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.parametrize("override, expected", [
    ("train.epochs=many", "error: train.epochs: expected an integer, got 'many'"),
    ("scenario.num_tasks=4", "error: scenario.num_tasks: 4 declared, but 6 classes"),
    ("data.num_classes=7", "error: data.num_classes: recipe declares 7 but the data has 6"),
    ("backbone.name=vit_nonexistent", "error: backbone.name: 'vit_nonexistent' is not a timm model"),
])
def test_user_errors_are_one_line(tiny_npz, tmp_path, override, expected):
    """In this process: an exception escaping the CLI would fail the test with its traceback."""
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_npz, tmp_path / "runs"))
    done = run_cli_here("train", str(recipe), override)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(expected)
    assert "Traceback" not in done.stderr


def test_list_names_methods_benchmarks_and_recipes_with_their_targets(tmp_path):
    done = _slca("list", cwd=tmp_path)
    assert "slca" in done.stdout and "cars196" in done.stdout
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ")}
    # every packaged recipe (with cifar100/slca_hf_vit, the 3 demo recipes and digits/slca), by the name
    # `slca train` takes
    assert len(lines) == 4 * 33 + 31 + 1 + 3 + 1 and lines["demo/slca"].strip() == "demo/slca"
    assert lines["cifar100/slca"].endswith("slca_table1: Last 91.53±0.28, Inc 94.09±0.87")
    assert lines["imagenet_r/dualprompt"].endswith(
        "slca_table1: Last 68.5±0.52, Inc 72.59±0.24; method_papers: Last 68.13")
    assert lines["cub200/den"].strip() == "cub200/den"  # no published number


def test_seeds_run_sibling_folders_and_report_averages_them(tiny_npz, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_npz, tmp_path / "runs", method="seq_ft"))
    done = _slca("train", str(recipe), "train.epochs=1", "--seeds", "1993", "1996", "7", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    runs = [json.loads((tmp_path / "runs" / f"tiny_seq_ft_seed{s}" / "results.json").read_text())
            for s in (1993, 1996, 7)]
    assert [r["config"]["scenario"]["class_order_seed"] for r in runs] == [1993, 1996, 7]
    assert len({tuple(r["class_order"]) for r in runs}) == 3
    again = run_cli_here("train", str(recipe), "train.epochs=1", "--seeds", "1993", "1996", "7")
    assert again.stdout.count("complete, skipped") == 3
    reported = run_cli_here("report", *[str(tmp_path / "runs" / f"tiny_seq_ft_seed{s}") for s in (1993, 1996, 7)])
    assert reported.returncode == 0, reported.stderr
    last = [r["last_acc"] for r in runs]
    mean = sum(last) / 3
    std = (sum((v - mean) ** 2 for v in last) / 2) ** 0.5
    assert f"| seq_ft | 1993, 1996, 7 | {mean:.2f} ± {std:.2f} |" in reported.stdout
