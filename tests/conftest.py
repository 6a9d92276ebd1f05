"""Shared fixtures: a tiny, learnable synthetic image set and recipes for a tiny ViT (CPU, seconds)."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

SHARED = Path(os.environ.get("SLCA_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def pytest_collection_finish(session):
    """Every run ends its tasks with accelerate's free_memory, a full gc.collect; in this process it would walk
    torch's, timm's, matplotlib's ... import-time objects each time. Freezing them (they live to the end anyway)
    makes those collections walk only what the tests made."""
    gc.collect()
    gc.freeze()


def make_color_images(num_classes: int, per_class: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Each class is a mean colour plus a class-specific stripe, with pixel noise: separable but not trivial."""
    rng = np.random.RandomState(seed)
    palette = np.random.RandomState(0).randint(30, 225, size=(num_classes, 3))
    images, labels = [], []
    for label in range(num_classes):
        for _ in range(per_class):
            image = palette[label][None, None, :] + rng.normal(0, 25, size=(size, size, 3))
            row = (label * 5) % size
            image[row:row + 4, :, :] = 255 - palette[label]
            images.append(np.clip(image, 0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int16)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    train_x, train_y = make_color_images(6, 16, seed=1)
    test_x, test_y = make_color_images(6, 6, seed=2)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
             classes=np.array([f"class_{i}" for i in range(6)]))
    return path


TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


def tiny_recipe(npz: Path, output_dir: Path, method: str = "slca", **sections) -> dict:
    """A 3-task (2 classes each) recipe on the tiny set; keyword arguments update whole sections."""
    recipe = {
        "name": f"tiny_{method}",
        "output_dir": str(output_dir),
        "data": {"source": "arrays", "path": str(npz), "num_classes": 6, "image_size": 32, "transform": "none",
                 "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "scenario": {"increment": 2, "class_order_seed": 1993},
        "backbone": {"name": "vit_tiny_patch16_224", "model_kwargs": dict(TINY_VIT)},
        "method": {"name": method, "params": {}},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "eval_batch_size": 32},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section].update(values)
        else:
            recipe[section] = values
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: ../shared (or $SLCA_SHARED) is absent on this machine")
    return path


class Interrupted(Exception):
    """Stands for a crash between two tasks in tests that resume afterwards."""


def interrupt_after(trainer, task: int) -> None:
    """Make ``trainer.run()`` raise Interrupted right after task ``task`` finished (checkpoint written)."""
    original = trainer._run_task

    def run_task(index, *rest, **kwargs):
        original(index, *rest, **kwargs)
        if index == task:
            raise Interrupted

    trainer._run_task = run_task


def interrupt_before_epoch(trainer, task: int, epoch: int) -> None:
    """Make ``trainer.run()`` raise Interrupted when epoch ``epoch`` of task ``task`` is about to start."""
    original = trainer._train_epoch

    def train_epoch(prepared, ctx, current, *rest):
        if ctx.task == task and current == epoch:
            raise Interrupted
        original(prepared, ctx, current, *rest)

    trainer._train_epoch = train_epoch


def run_interrupted_and_resumed(make_trainer, tmp_path: Path, after_task: int):
    """``make_trainer(folder)`` run once uninterrupted under ``tmp_path/ref``, and once under ``tmp_path/cut``
    interrupted right after task ``after_task`` then resumed with a new trainer. Returns
    (reference trainer, its results, resumed trainer, its results)."""
    reference = make_trainer(tmp_path / "ref")
    expected = reference.run()
    cut = make_trainer(tmp_path / "cut")
    interrupt_after(cut, after_task)
    with pytest.raises(Interrupted):
        cut.run()
    resumed = make_trainer(tmp_path / "cut")
    return reference, expected, resumed, resumed.run(resume=True)


def tiny_timm_vit():
    """A randomly initialised timm ViT of TINY_VIT's size (seed 0), in eval mode, without a head."""
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT).eval()


def hooked_vit_trainer(npz: Path, output_dir: Path, method: str, **params):
    """A tiny run of a method that hooks modules into timm's ViT blocks (RanPAC, APER, EASE): the final norm kept,
    as their recipes, SGD at lr 0.05 with a cosine schedule, ``params`` as method.params."""
    from slca_kit.resolve import config_from_dict
    from slca_kit.trainer import Trainer

    recipe = tiny_recipe(npz, output_dir, method=method, backbone={"replace_final_norm": False})
    recipe["method"]["params"] = params
    recipe["train"].update(scheduler="cosine", lr=0.05)
    return Trainer(config_from_dict(recipe))


def record_after_each_task(trainer, state_of) -> list:
    """The list that ``state_of(model)`` fills with one entry per task, taken after the task's evaluation."""
    states, end_task = [], trainer.method.end_task

    def record(model, ctx):
        end_task(model, ctx)
        states.append(state_of(model))

    trainer.method.end_task = record
    return states


def cloned_state(module) -> dict:
    return {key: value.clone() for key, value in module.state_dict().items()}


def run_cli_here(*args: str):
    """``slca ARGS`` in this process (no interpreter start-up): its exit status, stdout and stderr, as
    ``subprocess.run`` would give them."""
    import io
    import types
    from contextlib import redirect_stderr, redirect_stdout

    from slca_kit import cli

    out, err = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        status = cli.main(list(args))
    return types.SimpleNamespace(returncode=status, stdout=out.getvalue(), stderr=err.getvalue())
