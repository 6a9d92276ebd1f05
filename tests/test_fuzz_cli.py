"""Careless input, generated: 200+ random recipes (keys from the schema with wrong types or out-of-range values,
unknown keys, malformed overrides, small corrupt .npz files) through the CLI in-process. Each must end with exit
status 0, or 2 and exactly one ``error:`` line naming a key, file or value; never a traceback."""
from __future__ import annotations

import dataclasses
import io
import random
import re
import typing
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import yaml

from slca_kit import cli
from slca_kit.config import Config
from slca_kit.methods import METHODS

from conftest import make_color_images

CASES = 210
TINY_VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
# values that are wrong for most keys, or out of range for numbers
WRONG_TYPES = ["text", [1, 2], {"a": 1}, True, 3.5, None, "", [], "1e999"]
OUT_OF_RANGE = [-1, 0, -0.5, -10**9, float("nan"), float("inf"), -float("inf")]
VALID = [("train.epochs", 0), ("train.epochs", 2), ("method.name", "seq_ft"), ("method.name", "slca_pp"),
         ("train.optimizer", "adamw"), ("train.scheduler", "cosine"), ("data.transform", "cifar"),
         ("scenario.class_order_seed", None), ("scenario.init_classes", 3), ("train.grad_clip", 1.0),
         ("method.params.logit_norm_tau", None), ("train.gradient_accumulation_steps", 2), ("data.bad_images", "skip"),
         ("train.checkpoint_every_epoch", True), ("method.params.mean_shrink", False), ("train.lr", 1e-3)]


def schema(cls=Config, prefix="") -> dict[str, typing.Any]:
    """Every dotted key of the config with its annotation (method params: the default method's)."""
    keys = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        name = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hints[field.name]):
            keys.update(schema(hints[field.name], f"{name}."))
        elif name != "method.params":
            keys[name] = hints[field.name]
    for field in dataclasses.fields(METHODS["slca"].Params):
        keys[f"method.params.{field.name}"] = typing.get_type_hints(METHODS["slca"].Params)[field.name]
    return keys


def base_recipe(npz, out) -> dict:
    return {
        "name": "fuzz", "output_dir": str(out),
        "data": {"source": "arrays", "path": str(npz), "num_classes": 4, "image_size": 16, "transform": "none",
                 "mean": [0.5] * 3, "std": [0.5] * 3},
        "scenario": {"increment": 2},
        "backbone": {"name": "vit_tiny_patch16_224", "model_kwargs": dict(TINY_VIT)},
        "method": {"name": "slca", "params": {"ca_epochs": 1, "samples_per_class": 4}},
        "train": {"epochs": 1, "batch_size": 4, "eval_batch_size": 8, "lr": 0.01},
    }


def set_key(recipe: dict, dotted: str, value) -> None:
    node = recipe
    *parents, last = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


def is_number(tp) -> bool:
    return tp in (int, float) or typing.get_origin(tp) in (typing.Union, type(int | None)) and any(
        arg in (int, float) for arg in typing.get_args(tp))


def corrupt_npz(rng: random.Random, folder, index) -> tuple[str, str]:
    """A small broken .npz and the text its error should name (the file)."""
    x, y = make_color_images(4, 3, seed=index, size=16)
    tx, ty = make_color_images(4, 2, seed=index + 1, size=16)
    arrays = {"train_x": x, "train_y": y.astype(np.int64), "test_x": tx, "test_y": ty.astype(np.int64)}
    kind = rng.choice(["bytes", "truncated", "float-labels", "nan-labels", "label-range", "negative", "dtype",
                       "shape", "lengths", "empty", "missing", "2d-labels", "text-labels", "one-class-image"])
    path = folder / f"broken_{index}_{kind}.npz"
    if kind == "bytes":
        path.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))))
        return str(path), path.name
    if kind == "float-labels":
        arrays["train_y"] = arrays["train_y"] + rng.choice([0.5, 0.25, 1e-3])
    elif kind == "nan-labels":
        arrays["train_y"] = arrays["train_y"].astype(float)
        arrays["train_y"][rng.randrange(len(y))] = float("nan")
    elif kind == "label-range":
        arrays["test_y"] = arrays["test_y"] + 7
    elif kind == "negative":
        arrays["train_y"] = arrays["train_y"] - 1
    elif kind == "dtype":
        arrays["train_x"] = arrays["train_x"].astype(rng.choice([np.float32, np.int64]))
    elif kind == "shape":
        arrays["test_x"] = arrays["test_x"].reshape(len(ty), -1)[:, :7]
    elif kind == "lengths":
        arrays["train_y"] = arrays["train_y"][:-2]
    elif kind == "empty":
        key = rng.choice(["train", "test"])
        arrays[f"{key}_x"], arrays[f"{key}_y"] = arrays[f"{key}_x"][:0], arrays[f"{key}_y"][:0]
    elif kind == "missing":
        del arrays[rng.choice(list(arrays))]
    elif kind == "2d-labels":
        arrays["train_y"] = arrays["train_y"][:, None]
    elif kind == "text-labels":
        arrays["train_y"] = arrays["train_y"].astype(str)
    elif kind == "one-class-image":
        arrays["train_x"], arrays["train_y"] = arrays["train_x"][2:], arrays["train_y"][2:]
    np.savez(path, **arrays)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:rng.randint(10, 400)])
    return str(path), path.name


def mutation(rng: random.Random, keys: dict, folder, index) -> tuple[dict, list[str], list[str]]:
    """A broken recipe, its command-line overrides, and the texts one of which its error must contain."""
    recipe = base_recipe(folder / "good.npz", folder / "runs" / str(index))
    overrides: list[str] = []
    names: list[str] = []
    for _ in range(rng.choice([1, 1, 2])):
        kind = rng.choice(["type", "type", "range", "range", "unknown", "override", "npz", "valid", "valid"])
        key = rng.choice(sorted(keys))
        if kind == "valid":  # a legitimate change, so that many generated recipes also run to the end
            key, value = rng.choice(VALID)
            set_key(recipe, key, value)
            names += [key, str(value)]
            continue
        if kind == "type":
            value = rng.choice(WRONG_TYPES)
        elif kind == "range":
            value = rng.choice(OUT_OF_RANGE) if is_number(keys[key]) else rng.choice(WRONG_TYPES)
        elif kind == "unknown":
            key, value = key[:-1] + rng.choice("xyz_"), 1
        elif kind == "override":
            overrides.append(rng.choice(["=3", "train.=3", ".x=1", "train.epochs", "train.lr=[", f"{key}=", "=",
                                         f"{key}=oops", f"{key}.sub=1", f"{key}={{a: 1, a: 2}}"]))
            names += [key, key.rsplit(".", 1)[-1], overrides[-1]]
            continue
        else:
            path, name = corrupt_npz(rng, folder, index)
            set_key(recipe, "data.path", path)
            names += [name, "data.path"]
            continue
        set_key(recipe, key, value)
        names += [key, key.rsplit(".", 1)[-1], str(value)]
    return recipe, overrides, names


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    x, y = make_color_images(4, 3, seed=0, size=16)
    tx, ty = make_color_images(4, 2, seed=1, size=16)
    np.savez(root / "good.npz", train_x=x, train_y=y, test_x=tx, test_y=ty)
    return root


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            status = cli.main(argv)
        except SystemExit as exit_:  # argparse: a malformed command line
            status = exit_.code
    return status, err.getvalue()


def test_two_hundred_random_recipes_fail_cleanly_or_run(folder, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.chdir(folder)  # relative output_dir values ("text") land in the temporary folder
    keys = schema()
    rng = random.Random(20261124)
    outcomes = {0: 0, 2: 0}
    for index in range(CASES):
        recipe, overrides, names = mutation(rng, keys, folder, index)
        path = folder / f"recipe_{index}.yaml"
        path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        status, err = run_cli(["train", str(path), *overrides])
        context = f"case {index}: {yaml.safe_dump(recipe)} {overrides}\n{err[-3000:]}"
        assert status in (0, 2), context
        assert "Traceback" not in err, context
        outcomes[status] += 1
        if status == 2:
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, context
            named = [text for text in names + [str(path), path.name] if text and text in errors[0]]
            assert named or re.search(r"\b(data|train|scenario|backbone|method|adapter)\.\w+", errors[0]), context
    # the generator makes both outcomes common: the test is not trivially all-errors or all-runs
    assert outcomes[0] >= 10 and outcomes[2] >= 100, outcomes


def test_the_schema_covers_every_section():
    keys = schema()
    assert {key.split(".")[0] for key in keys} == {"name", "output_dir", "data", "scenario", "backbone", "method",
                                                    "train", "adapter"}
    assert keys["train.lr"] is float and keys["method.params.logit_norm_tau"] == float | None
