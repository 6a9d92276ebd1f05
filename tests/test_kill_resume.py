"""kill -9 a real training process at several points, resume it, and get the same accuracy matrix as a run that
was never interrupted, bitwise on CPU (every task and epoch is re-seeded, augmentation is seeded per image)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe, write_recipe

# (log line that starts the stage, seconds to wait before SIGKILL)
KILL_POINTS = [
    ("task 2: train", 0.5),  # in the middle of task 2's epochs
    ("task 2: statistics", 0.0),  # while class statistics are computed
    ("task 3: alignment", 0.0),  # during classifier alignment
    ("task 2: saving checkpoint", 0.0),  # while a checkpoint is being written
]


def _command(recipe, *extra):
    return [sys.executable, "-m", "slca_kit", "train", str(recipe), *extra]


def _env():
    return {**os.environ, "TQDM_DISABLE": "1"}


def _kill_at(recipe, marker, delay, cwd, *extra):
    process = subprocess.Popen(_command(recipe, *extra), cwd=cwd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               text=True, env=_env())
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if marker in line:
                time.sleep(delay)
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL, f"never saw {marker!r}: {''.join(seen)[-2000:]}"


@pytest.fixture(scope="module")
def setting(tiny_npz, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    recipe = tiny_recipe(tiny_npz, root / "runs", train={"epochs": 3, "checkpoint_every_epoch": True},
                         data={"transform": "cifar"})  # random augmentation, to show it is reproduced too
    recipe["method"]["params"] = {"ca_epochs": 8, "samples_per_class": 512}  # a longer alignment to land in
    path = write_recipe(root / "tiny.yaml", recipe)
    done = subprocess.run(_command(path, "name=reference"), cwd=root, capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    reference = json.loads((root / "runs" / "reference" / "results.json").read_text())
    return root, path, reference


@pytest.mark.parametrize("marker, delay", KILL_POINTS, ids=[m.split(": ")[1].replace(" ", "_") for m, _ in KILL_POINTS])
def test_kill_then_resume_matches_uninterrupted(setting, marker, delay):
    root, recipe, reference = setting
    name = f"name=killed_{marker.replace(' ', '_').replace(':', '')}"
    _kill_at(recipe, marker, delay, root, name)
    run_dir = root / "runs" / name.split("=", 1)[1]
    assert not json.loads((run_dir / "results.json").read_text())["complete"]
    done = subprocess.run(_command(recipe, name, "--resume"), cwd=root, capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["complete"]
    assert resumed["correct"] == reference["correct"]
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    # bitwise the same weights
    resumed_weights, reference_weights = _final_weights(run_dir), _final_weights(root / "runs" / "reference")
    for name, value in reference_weights.items():
        assert torch.equal(resumed_weights[name], value), name


def _final_weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / "task_002" / "model.safetensors"))
