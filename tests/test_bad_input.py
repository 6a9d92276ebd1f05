"""Bad input, one case per row: each gives a one-line error naming the key, file or value and what is valid,
before any work starts or without losing finished tasks. The cases are counted by the parametrization."""
from __future__ import annotations

import copy
import errno
import json
import logging
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from slca_kit import checkpoint as ckpt
from slca_kit.config import apply_overrides, load_recipe_dict
from slca_kit.resolve import config_from_dict, load_config
from slca_kit.errors import (CheckpointError, ConfigError, DataError, Preempted, RunFolderBusy, SlcaKitError,
                             TrainingDiverged)
from slca_kit.trainer import Trainer

from conftest import TINY_VIT, Interrupted, interrupt_after, make_color_images, tiny_recipe


def _set(recipe: dict, dotted: str, value) -> dict:
    recipe = copy.deepcopy(recipe)
    node = recipe
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return recipe


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _weights(path, **vit_overrides):
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**TINY_VIT, **vit_overrides})
    save_file(model.state_dict(), str(path))
    return str(path)


# (case id, how to break the tiny recipe: (recipe, tmp_path) -> recipe, error type, text the message must contain)
RECIPE_CASES = [
    ("unknown-top-key", lambda r, t: {**r, "trian": {}}, ConfigError, "unknown key 'trian' (did you mean 'train'?)"),
    ("misspelt-nested-key", lambda r, t: _set(r, "train.epoch", 3), ConfigError,
     "train: unknown key 'epoch' (did you mean 'epochs'?)"),
    ("int-as-string", lambda r, t: _set(r, "train.epochs", "ten"), ConfigError,
     "train.epochs: expected an integer, got 'ten'"),
    ("float-as-list", lambda r, t: _set(r, "train.lr", [1]), ConfigError, "train.lr: expected a number"),
    ("bool-as-string", lambda r, t: _set(r, "backbone.pretrained", "yes"), ConfigError,
     "backbone.pretrained: expected true or false"),
    ("list-as-int", lambda r, t: _set(r, "train.milestones", 5), ConfigError, "train.milestones: expected a list"),
    ("section-not-mapping", lambda r, t: {**r, "train": 3}, ConfigError, "train: expected a mapping"),
    ("bad-precision", lambda r, t: _set(r, "train.mixed_precision", "fp8"), ConfigError,
     "train.mixed_precision: 'fp8' is not one of no, fp16, bf16"),
    ("bad-transform", lambda r, t: _set(r, "data.transform", "autoaugment"), ConfigError,
     "data.transform: 'autoaugment' is not one of cifar, imagenet_r, cub_cars, pilot, pilot_cifar, none"),
    ("bad-source", lambda r, t: _set(r, "data.source", "s3"), ConfigError, "data.source: 's3' is not one of"),
    ("missing-npz", lambda r, t: _set(r, "data.path", str(t / "nope.npz")), ConfigError, "nope.npz does not exist"),
    ("missing-image-folder", lambda r, t: _set(_set(r, "data.source", "imagefolder"), "data.path", str(t / "imgs")),
     ConfigError, "data.path:"),
    ("hub-without-id", lambda r, t: _set(r, "data.source", "hub"), ConfigError,
     "data.hub_id: required when data.source is 'hub'"),
    ("missing-weights", lambda r, t: _set(r, "backbone.weights", "/no/such.safetensors"), ConfigError,
     "backbone.weights: file not found: /no/such.safetensors"),
    ("missing-card", lambda r, t: _set(r, "backbone.card", "/no/card.json"), ConfigError,
     "backbone.card: file not found"),
    ("unknown-method", lambda r, t: _set(r, "method.name", "slcaa"), ConfigError,
     "method.name: unknown method 'slcaa'; valid:"),
    ("unknown-method-param", lambda r, t: _set(r, "method.params", {"ca_epoch": 3}), ConfigError,
     "method.params: unknown key 'ca_epoch' (did you mean 'ca_epochs'?)"),
    ("method-param-type", lambda r, t: _set(r, "method.params", {"logit_norm_tau": "low"}), ConfigError,
     "method.params.logit_norm_tau"),
    ("unknown-benchmark", lambda r, t: _set(r, "data.benchmark", "cifar10"), ConfigError,
     "data.benchmark: unknown benchmark 'cifar10'"),
    ("zero-batch", lambda r, t: _set(r, "train.batch_size", 0), ConfigError, "train.batch_size: must be > 0"),
    ("negative-increment", lambda r, t: _set(r, "scenario.increment", -1), ConfigError,
     "scenario.increment: must be > 0"),
    ("test-fraction-range", lambda r, t: _set(r, "data.test_fraction", 1.5), ConfigError,
     "data.test_fraction: must be between 0 and 1"),
    ("milestones-order", lambda r, t: _set(r, "train.milestones", [5, 2]), ConfigError,
     "train.milestones: must be increasing"),
    ("keep-zero-checkpoints", lambda r, t: _set(r, "train.keep_checkpoints", 0), ConfigError,
     "train.keep_checkpoints: must be > 0"),
    ("two-mean-values", lambda r, t: _set(r, "data.mean", [0.5, 0.5]), ConfigError, "data.mean: needs 3 values (RGB)"),
    ("unset-env-path", lambda r, t: _set(r, "data.path", "${SLCA_NOT_SET_ANYWHERE}/x.npz"), ConfigError,
     "environment variable SLCA_NOT_SET_ANYWHERE is not set"),
    # checks that need the data or the model, made when the trainer is built
    ("num-tasks-mismatch", lambda r, t: _set(r, "scenario.num_tasks", 4), ConfigError,
     "scenario.num_tasks: 4 declared, but 6 classes"),
    ("init-exceeds-classes", lambda r, t: _set(r, "scenario.init_classes", 8), ConfigError,
     "scenario.init_classes: 8 exceeds the 6 classes"),
    ("class-count-mismatch", lambda r, t: _set(r, "data.num_classes", 10), DataError,
     "data.num_classes: recipe declares 10 but the data has 6"),
    ("empty-class", lambda r, t: _set(_set(r, "data.num_classes", 3), "data.path", _npz(
        t / "gap.npz", train_x=make_color_images(3, 4, 0)[0],
        train_y=np.repeat([0, 2, 2], 4), test_x=make_color_images(3, 2, 1)[0], test_y=np.repeat([0, 1, 2], 2))),
     DataError, "classes without training images: [1]"),
    ("duplicate-class-names", lambda r, t: _set(_set(r, "data.num_classes", 2), "data.path", _npz(
        t / "dup.npz", train_x=make_color_images(2, 4, 0)[0], train_y=np.repeat([0, 1], 4),
        test_x=make_color_images(2, 2, 1)[0], test_y=np.repeat([0, 1], 2), classes=np.array(["rose", "rose"]))),
     DataError, "duplicate class names"),
    ("missing-array-key", lambda r, t: _set(r, "data.path", _npz(t / "bad.npz", x=np.zeros((2, 4, 4), np.uint8))),
     DataError, "has no arrays ['train_x'"),
    ("not-an-npz", lambda r, t: _set(r, "data.path", str((t / "text.npz").resolve()) if (t / "text.npz").write_text(
        "hello") else ""), DataError, "text.npz is not a complete .npz file"),
    ("float-images", lambda r, t: _set(_set(r, "data.num_classes", 4), "data.path", _npz(
        t / "float.npz", train_x=np.zeros((4, 8, 8), np.float32), train_y=np.arange(4),
        test_x=np.zeros((4, 8, 8), np.float32), test_y=np.arange(4))), DataError, "images must be uint8"),
    ("negative-label", lambda r, t: _set(_set(r, "data.num_classes", None), "data.path", _npz(
        t / "neg.npz", train_x=np.zeros((2, 8, 8), np.uint8), train_y=np.array([-1, 0]),
        test_x=np.zeros((2, 8, 8), np.uint8), test_y=np.array([0, 0]))), DataError, "labels must be >= 0"),
    ("unknown-timm-model", lambda r, t: _set(r, "backbone.name", "vit_tiny_patch17_224"), ConfigError,
     "backbone.name: 'vit_tiny_patch17_224' is not a timm model; did you mean"),
    ("weights-extra-blocks", lambda r, t: _set(r, "backbone.weights", _weights(t / "deep.safetensors", depth=3)),
     CheckpointError, "unexpected keys, first ['blocks.2"),
    ("weights-wrong-width", lambda r, t: _set(r, "backbone.weights", _weights(
        t / "wide.safetensors", embed_dim=96, num_heads=3)), CheckpointError, "shape mismatches"),
    ("weights-corrupt", lambda r, t: _set(r, "backbone.weights", str(t / "broken.safetensors") if (
        t / "broken.safetensors").write_bytes(b"garbage") else ""), CheckpointError, "cannot read"),
    ("fractional-labels", lambda r, t: _set(r, "data.path", _npz(
        t / "half.npz", train_x=make_color_images(6, 4, 0)[0], train_y=np.repeat(np.arange(6), 4) + 0.5,
        test_x=make_color_images(6, 2, 1)[0], test_y=np.repeat(np.arange(6), 2))), DataError,
     "half.npz/train: labels must be whole numbers (class ids 0..K-1), found 0.5 at position 0 (24 such labels)"),
    ("text-labels", lambda r, t: _set(r, "data.path", _npz(
        t / "text_labels.npz", train_x=make_color_images(6, 4, 0)[0], train_y=np.repeat(list("abcdef"), 4),
        test_x=make_color_images(6, 2, 1)[0], test_y=np.repeat(np.arange(6), 2))), DataError,
     "text_labels.npz/train: labels must be integers, got <U1 values"),
    ("empty-train-split", lambda r, t: _set(r, "data.path", _npz(
        t / "empty.npz", train_x=np.zeros((0, 8, 8), np.uint8), train_y=np.zeros(0, np.int64),
        test_x=make_color_images(6, 2, 1)[0], test_y=np.repeat(np.arange(6), 2))), DataError,
     "empty.npz/train: the split has no images"),
    ("one-image-class-for-slca", lambda r, t: _set(r, "data.path", _npz(
        t / "single.npz", train_x=make_color_images(6, 4, 0)[0][3:], train_y=np.repeat(np.arange(6), 4)[3:],
        test_x=make_color_images(6, 2, 1)[0], test_y=np.repeat(np.arange(6), 2))), DataError,
     "single.npz/train: class '0' (label 0) has 1 training image(s), slca's class covariance needs at least 2"),
    ("task-without-test-images", lambda r, t: _set(r, "data.path", _npz(
        t / "no_test.npz", train_x=make_color_images(6, 4, 0)[0], train_y=np.repeat(np.arange(6), 4),
        test_x=make_color_images(6, 2, 1)[0][:2], test_y=np.zeros(2, np.int64))), DataError,
     "has no test images, so its accuracy is undefined"),
    ("tau-zero", lambda r, t: _set(r, "method.params", {"logit_norm_tau": 0}), ConfigError,
     "method.params.logit_norm_tau: must be > 0, got 0"),
    ("negative-method-param", lambda r, t: _set(r, "method.params", {"ca_epochs": -1}), ConfigError,
     "method.params.ca_epochs: must be >= 0, got -1"),
    ("top-k-exceeds-pool", lambda r, t: _set(_set(r, "method.name", "l2p"), "method.params", {"top_k": 20}),
     ConfigError, "method.params.top_k: 20 prompts cannot be chosen from a pool of 10"),
    ("infinite-lr", lambda r, t: _set(r, "train.lr", float("inf")), ConfigError,
     "train.lr: expected a finite number, got inf"),
    ("batch-not-divisible", lambda r, t: _set(_set(r, "train.batch_size", 15), "train.gradient_accumulation_steps",
                                              2), ConfigError, "train.batch_size: 15 must divide by processes"),
]


@pytest.mark.parametrize("case, breaks, error, text", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe(case, breaks, error, text, tiny_npz, tmp_path):
    recipe = breaks(tiny_recipe(tiny_npz, tmp_path / "runs"), tmp_path)
    with pytest.raises(error) as info:
        Trainer(config_from_dict(recipe))
    message = str(info.value)
    assert text in message and "\n" not in message


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="a recipe must be a mapping"):
        load_recipe_dict(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("train: {epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe_dict(tmp_path / "broken.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe_dict(tmp_path / "a.yaml")
    for bad in ("train.epochs", "=3", "train.=3", ".lr=3"):
        with pytest.raises(ConfigError, match="expected KEY=VALUE with a dotted KEY"):
            apply_overrides({}, [bad])
    (tmp_path / "twice.yaml").write_text("train:\n  lr: 0.1\nname: x\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: duplicate key 'train' on lines 1 and 4"):
        load_recipe_dict(tmp_path / "twice.yaml")
    (tmp_path / "nested.yaml").write_text("method:\n  params:\n    ca_lr: 0.1\n    ca_lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'ca_lr' on lines 3 and 4"):
        load_recipe_dict(tmp_path / "nested.yaml")
    with pytest.raises(ConfigError, match=r"override 'method.params=\{a: 1, a: 2\}': duplicate key 'a'"):
        apply_overrides({}, ["method.params={a: 1, a: 2}"])


def test_yaml_merge_keys_may_repeat_and_exponents_are_numbers(tmp_path):
    """'<<: *anchor' then an explicit key is how YAML overrides a merged value, not a duplicate; 1e-3 is the
    number YAML 1.2 reads (PyYAML alone would give the string '1e-3')."""
    (tmp_path / "merge.yaml").write_text("base: &b {lr: 0.1, epochs: 3}\ntrain:\n  <<: *b\n  lr: 1e-3\n")
    assert load_recipe_dict(tmp_path / "merge.yaml")["train"] == {"lr": 0.001, "epochs": 3}
    assert apply_overrides({"train": None}, ["train.lr=5e-2", "train.eps=1.5E+3"]) == {
        "train": {"lr": 0.05, "eps": 1500.0}}


# -- image files -------------------------------------------------------------------------------------------------
def _folder_with_bad_images(root):
    x, y = make_color_images(4, 5, seed=0, size=16)
    for split in ("train", "test"):
        for i, (image, label) in enumerate(zip(x, y)):
            folder = root / split / f"kind_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    (root / "train" / "kind_1" / "garbage.png").write_bytes(b"this is not a png")
    good = (root / "train" / "kind_2" / "10.png").read_bytes()
    (root / "train" / "kind_2" / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def _folder_recipe(tiny_npz, tmp_path, bad_images):
    root = _folder_with_bad_images(tmp_path / "imgs")
    return tiny_recipe(tiny_npz, tmp_path / "runs", data={
        "source": "imagefolder", "path": str(root), "num_classes": 4, "bad_images": bad_images, "image_size": 32,
        "transform": "none", "mean": [0.5] * 3, "std": [0.5] * 3}, train={"epochs": 1, "batch_size": 8})


def test_unreadable_image_fails_naming_the_file(tiny_npz, tmp_path):
    trainer = Trainer(config_from_dict(_folder_recipe(tiny_npz, tmp_path, "fail")))
    with pytest.raises(DataError, match=r"cannot decode image .*(garbage|truncated)\.png.*bad_images: skip"):
        trainer.run()


def test_unreadable_images_skipped_and_counted(tiny_npz, tmp_path):
    trainer = Trainer(config_from_dict(_folder_recipe(tiny_npz, tmp_path, "skip")))
    assert len(trainer.data.train) == 20  # 22 files, 2 unreadable
    results = trainer.run()
    assert results["skipped_images"]["count"] == 2
    skipped = sorted(results["skipped_images"]["first"], key=lambda entry: entry["file"])
    assert [entry["file"].rsplit("/", 1)[-1] for entry in skipped] == ["garbage.png", "truncated.png"]
    assert "truncated" in skipped[1]["error"]


# -- during a run ------------------------------------------------------------------------------------------------
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny_npz, tmp_path):
    trainer = Trainer(config_from_dict(tiny_recipe(tiny_npz, tmp_path, method="seq_ft", train={"epochs": 1})))
    original = trainer.method.training_loss

    def loss(model, images, labels, ctx):
        value = original(model, images, labels, ctx)
        return value * float("nan") if ctx.task == 1 else value

    trainer.method.training_loss = loss
    with pytest.raises(TrainingDiverged, match=r"^training: task 1, epoch 0, step 0: loss is nan"):
        trainer.run()
    checkpoints = ckpt.complete_checkpoints(tmp_path / "tiny_seq_ft" / "checkpoints")
    assert [p.name for p in checkpoints] == ["task_000"]
    partial = json.loads((tmp_path / "tiny_seq_ft" / "results.json").read_text())
    assert len(partial["accuracy_matrix"]) == 1


def _nan_after_training(trainer):
    original = trainer.method.after_training

    def after_training(model, ctx):
        original(model, ctx)
        if ctx.task == 1:
            with torch.no_grad():
                model.head.heads[0].weight[0, 0] = float("nan")

    trainer.method.after_training = after_training


def _nan_logits(trainer):
    original = trainer.method.predict

    def predict(model, images, ctx):
        logits = original(model, images, ctx)
        return logits * float("nan") if ctx.task == 1 else logits

    trainer.method.predict = predict


def _infinite_importance(trainer):
    original = trainer.method.task_importance

    def task_importance(model, ctx):
        importance = original(model, ctx)
        return {name: value * float("inf") if ctx.task == 1 else value for name, value in importance.items()}

    trainer.method.task_importance = task_importance


# (case, method, method params, change to the trainer, the error's beginning)
DIVERGED_CASES = [
    ("alignment", "slca", {"ca_lr": 1e30}, None,
     r"classifier alignment: task 1, epoch 0, step \d+: loss is nan; the last finished task's checkpoint is kept "
     r"\(lower method.params.ca_lr\?\)"),
    ("cvae-generator", "generative_replay", {"cvae_lr": 1e30, "cvae_epochs": 3}, None,
     r"cvae generator: task 0, epoch \d, step \d: loss is nan"),
    ("den-network", "den", {"lr": 1e30, "epochs": 3}, None, r"den network: task 0, epoch \d, step \d: loss is nan"),
    ("importance", "ewc", {}, _infinite_importance, r"ewc importance: task 1: importance of backbone\.\S+ has \d+ "
                                                    r"non-finite values \(first inf\)"),
    ("parameter-after-training", "seq_ft", {}, _nan_after_training,
     r"seq_ft after training: task 1: parameter head.heads.0.weight has 1 non-finite values \(first nan\)"),
    ("evaluation-logits", "slca", {}, _nan_logits,
     r"evaluation \(class-incremental\): task 1: 24 test images have NaN or infinite logits"),
]


@pytest.mark.parametrize("case, method, params, change, text", DIVERGED_CASES, ids=[c[0] for c in DIVERGED_CASES])
def test_non_finite_numbers_stop_the_task_naming_the_stage(case, method, params, change, text, tiny_npz, tmp_path):
    """Every stage that optimises or reports numbers checks them; the task in progress saves nothing."""
    recipe = tiny_recipe(tiny_npz, tmp_path, method=method, train={"epochs": 1})
    recipe["method"]["params"] = params
    trainer = Trainer(config_from_dict(recipe))
    if change is not None:
        change(trainer)
    with pytest.raises(TrainingDiverged, match=text) as info:
        trainer.run()
    assert "\n" not in str(info.value)
    run_dir = tmp_path / f"tiny_{method}"
    finished = int(text.split("task ")[1][0])  # the task that diverged
    assert [p.name for p in ckpt.complete_checkpoints(run_dir / "checkpoints")] == [
        f"task_{t:03d}" for t in range(finished)][-2:]
    if finished:
        partial = json.loads((run_dir / "results.json").read_text())
        assert len(partial["accuracy_matrix"]) == finished and all(
            math.isfinite(v) for row in partial["accuracy_matrix"] for v in row if v is not None)


def test_out_of_disk_while_saving_keeps_the_previous_checkpoint(tiny_npz, tmp_path, monkeypatch):
    trainer = Trainer(config_from_dict(tiny_recipe(tiny_npz, tmp_path, train={"epochs": 1})))
    original = trainer.accelerator.save_state

    def save_state(folder):
        if "task_001" in folder:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(folder)

    monkeypatch.setattr(trainer.accelerator, "save_state", save_state)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint task_001 .*No space left on device; "
                                              r"the previous checkpoint is intact: .*task_000"):
        trainer.run()
    root = tmp_path / "tiny_slca" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["task_000"]  # no staging folder left behind
    resumed = Trainer(config_from_dict(tiny_recipe(tiny_npz, tmp_path, train={"epochs": 1}))).run(resume=True)
    assert resumed["complete"]


def test_covariance_not_positive_definite_gets_jitter_and_a_message(tiny_npz, tmp_path, caplog):
    """16 images per class in 64 dimensions without the ridge: a singular covariance."""
    recipe = tiny_recipe(tiny_npz, tmp_path, train={"epochs": 1})
    recipe["method"]["params"] = {"cov_ridge": 0.0}
    with caplog.at_level(logging.INFO, logger="slca_kit"):
        results = Trainer(config_from_dict(recipe)).run()
    assert results["complete"]
    assert "covariance was not positive definite; added jitter" in caplog.text


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tiny_npz, tmp_path):
    reference = Trainer(config_from_dict(tiny_recipe(tiny_npz, tmp_path / "ref", train={"epochs": 1}))).run()
    recipe = tiny_recipe(tiny_npz, tmp_path / "cut", train={"epochs": 1})
    trainer = Trainer(config_from_dict(recipe))
    interrupt_after(trainer, 1)
    with pytest.raises(Interrupted):
        trainer.run()
    root = tmp_path / "cut" / "tiny_slca" / "checkpoints"
    weights = root / "task_001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated after the fact
    assert "truncated" in ckpt.verify(root / "task_001")
    assert ckpt.latest_valid_checkpoint(root, warn=lambda m: None).name == "task_000"
    resumed = Trainer(config_from_dict(recipe)).run(resume=True)
    assert resumed["correct"] == reference["correct"]


def test_resume_needs_a_checkpoint_and_a_new_run_never_overwrites(tiny_npz, tmp_path):
    recipe = tiny_recipe(tiny_npz, tmp_path, train={"epochs": 1})
    with pytest.raises(CheckpointError, match="--resume: no complete, undamaged checkpoint"):
        Trainer(config_from_dict(recipe)).run(resume=True)
    Trainer(config_from_dict(recipe)).run()
    with pytest.raises(CheckpointError, match="already holds checkpoints: pass --resume"):
        Trainer(config_from_dict(recipe)).run()


def test_every_error_is_a_slca_kit_error():
    for error in (ConfigError, DataError, CheckpointError, TrainingDiverged, RunFolderBusy, Preempted):
        assert issubclass(error, SlcaKitError)
