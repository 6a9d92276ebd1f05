"""A built wheel carries every recipe, and an installed wheel runs a packaged recipe by name from a folder outside
the repository (offline: no build isolation, no index; the venv sees this environment's torch and friends)."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import shared_path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_recipes_and_runs_one_by_name_outside_the_repository(tmp_path):
    shared = shared_path()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("slca_kit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = {str(p.relative_to(REPO)) for p in (REPO / "slca_kit" / "recipes").rglob("*.yaml")}
    assert packaged and packaged <= names, sorted(packaged - names)[:5]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import slca_kit; print(slca_kit.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where  # the wheel's copy, not the repository's
    env = {**os.environ, "SLCA_SHARED": str(shared), "TQDM_DISABLE": "1"}
    # epochs 0, 2 tasks and 2 training images per class: the point is finding and resolving the recipe
    done = subprocess.run([python, "-m", "slca_kit", "train", "proxy/slca", "train.epochs=0", "output_dir=runs",
                           "data.max_train_per_class=2", "scenario.increment=51", "scenario.num_tasks=2",
                           "method.params.ca_epochs=1"], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((elsewhere / "runs" / "slca" / "results.json").read_text())
    assert results["complete"] and results["totals"] and results["task_sizes"] == [51, 51]
