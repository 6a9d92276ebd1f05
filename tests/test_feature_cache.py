"""``train.feature_cache`` (slca_kit/feature_cache.py): with as many views as epochs it trains on exactly the
features the image path computes, so the runs agree; with the test transform it trains once-computed features; the
cache is written under the run folder and read back by a resumed task; methods whose backbone side trains are left
on the image path."""
from __future__ import annotations

import torch

from slca_kit.feature_cache import cache_file
from slca_kit.resolve import config_from_dict
from slca_kit.trainer import Trainer

from conftest import Interrupted, interrupt_before_epoch, tiny_recipe


def _trainer(tiny_npz, folder, method="linear_probe", **train):
    recipe = tiny_recipe(tiny_npz, folder, method=method, data={"transform": "cub_cars"})
    recipe["train"].update({"epochs": 3, **train})
    return Trainer(config_from_dict(recipe))


def test_as_many_views_as_epochs_trains_the_same_head_as_the_image_path(tiny_npz, tmp_path):
    plain = _trainer(tiny_npz, tmp_path / "plain")
    expected = plain.run()
    cached = _trainer(tiny_npz, tmp_path / "cached", feature_cache=True, feature_cache_views=3)
    results = cached.run()
    assert results["accuracy_matrix"] == expected["accuracy_matrix"]
    for ours, theirs in zip(cached.model.head.parameters(), plain.model.head.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert all("feature cache" in task["seconds"] for task in results["tasks"])
    stored = cache_file(cached.run_dir, 2)
    assert stored.is_file()


def test_test_transform_features_are_computed_once_and_a_resumed_task_reads_them_back(tiny_npz, tmp_path):
    def make(folder):
        return _trainer(tiny_npz, folder, feature_cache=True, checkpoint_every_epoch=True)

    reference = make(tmp_path / "ref")
    expected = reference.run()
    cut = make(tmp_path / "cut")
    interrupt_before_epoch(cut, task=1, epoch=2)
    try:
        cut.run()
    except Interrupted:
        pass
    resumed = make(tmp_path / "cut")
    results = resumed.run(resume=True)
    assert results["accuracy_matrix"] == expected["accuracy_matrix"]
    assert "feature cache" not in results["tasks"][1]["seconds"]  # read back from the run folder
    assert "feature cache" in results["tasks"][2]["seconds"]
    for ours, theirs in zip(resumed.model.head.parameters(), reference.model.head.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_a_method_whose_backbone_trains_keeps_the_image_path(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, method="seq_ft_sl", feature_cache=True, epochs=1)
    results = trainer.run()
    assert results["complete"] and not cache_file(trainer.run_dir, 0).exists()
    assert all("feature cache" not in task["seconds"] for task in results["tasks"])
