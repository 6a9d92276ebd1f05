"""Recipe validation: each bad input is a one-line error naming the key or path and what is valid."""
import pytest

from slca_kit.config import apply_overrides, config_from_dict, load_config, load_recipe_dict
from slca_kit.errors import ConfigError

from conftest import tiny_recipe, write_recipe


def _error(recipe: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(recipe)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_recipe_resolves_method_params(tiny_npz, tmp_path):
    cfg = config_from_dict(tiny_recipe(tiny_npz, tmp_path))
    assert cfg.method.params.ca_epochs == 5 and cfg.method.params.logit_norm_tau == 0.1
    assert cfg.train.milestones == [18] and cfg.scenario.class_order_seed == 1993


def test_unknown_top_level_key_suggests(tiny_npz, tmp_path):
    recipe = tiny_recipe(tiny_npz, tmp_path)
    recipe["trian"] = {}
    assert "unknown key 'trian' (did you mean 'train'?)" in _error(recipe)


def test_misspelt_nested_key(tiny_npz, tmp_path):
    recipe = tiny_recipe(tiny_npz, tmp_path, train={"epoch": 3})
    message = _error(recipe)
    assert "train: unknown key 'epoch'" in message and "did you mean 'epochs'" in message


def test_wrong_type_names_the_key(tiny_npz, tmp_path):
    assert "train.epochs: expected an integer, got 'ten'" in _error(tiny_recipe(tiny_npz, tmp_path,
                                                                                 train={"epochs": "ten"}))
    assert "train.lr: expected a number" in _error(tiny_recipe(tiny_npz, tmp_path, train={"lr": [1]}))
    assert "expected true or false" in _error(tiny_recipe(tiny_npz, tmp_path, backbone={"pretrained": "yes"}))


def test_choice_lists_valid_values(tiny_npz, tmp_path):
    message = _error(tiny_recipe(tiny_npz, tmp_path, train={"mixed_precision": "fp8"}))
    assert "train.mixed_precision: 'fp8' is not one of no, fp16, bf16" in message


def test_missing_data_file(tiny_npz, tmp_path):
    message = _error(tiny_recipe(tiny_npz, tmp_path, data={"path": str(tmp_path / "nope.npz")}))
    assert "data.path" in message and "nope.npz does not exist" in message


def test_missing_weights_file(tiny_npz, tmp_path):
    message = _error(tiny_recipe(tiny_npz, tmp_path, backbone={"name": "vit_tiny_patch16_224",
                                                               "weights": "/no/such.safetensors"}))
    assert message == "backbone.weights: file not found: /no/such.safetensors"


def test_unknown_method_and_param(tiny_npz, tmp_path):
    assert "method.name: unknown method 'slcaa'; valid:" in _error(tiny_recipe(tiny_npz, tmp_path, method="slcaa"))
    recipe = tiny_recipe(tiny_npz, tmp_path)
    recipe["method"]["params"] = {"ca_epoch": 3}
    assert "method.params: unknown key 'ca_epoch' (did you mean 'ca_epochs'?)" in _error(recipe)


def test_unknown_benchmark(tiny_npz, tmp_path):
    assert "data.benchmark: unknown benchmark 'cifar10'" in _error(tiny_recipe(tiny_npz, tmp_path,
                                                                               data={"benchmark": "cifar10"}))


def test_non_positive_values(tiny_npz, tmp_path):
    assert "train.batch_size: must be > 0" in _error(tiny_recipe(tiny_npz, tmp_path, train={"batch_size": 0}))
    assert "scenario.increment: must be > 0" in _error(tiny_recipe(tiny_npz, tmp_path, scenario={"increment": -1}))


def test_overrides_parse_yaml_values():
    data = apply_overrides({"train": {"epochs": 1}}, ["train.epochs=5", "train.milestones=[3, 4]",
                                                      "method.params.logit_norm_tau=null"])
    assert data == {"train": {"epochs": 5, "milestones": [3, 4]}, "method": {"params": {"logit_norm_tau": None}}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.epochs"])


def test_extends_merges_and_child_wins(tmp_path):
    write_recipe(tmp_path / "base.yaml", {"train": {"epochs": 50, "lr": 0.01}, "name": "base"})
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\ntrain: {epochs: 20}\n")
    assert load_recipe_dict(tmp_path / "child.yaml") == {"train": {"epochs": 20, "lr": 0.01}, "name": "child"}


def test_extends_cycle_and_missing_recipe(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe_dict(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "missing.yaml")


def test_env_expansion_in_paths(tiny_npz, tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_DATA_DIR", str(tiny_npz.parent))
    recipe = tiny_recipe(tiny_npz, tmp_path, data={"path": "${TINY_DATA_DIR}/tiny.npz"})
    assert config_from_dict(recipe).data.path == str(tiny_npz)
    recipe = tiny_recipe(tiny_npz, tmp_path, data={"path": "${NOT_SET_ANYWHERE:-" + str(tiny_npz) + "}"})
    assert config_from_dict(recipe).data.path == str(tiny_npz)


def test_benchmark_preset_fills_and_recipe_wins(tmp_path):
    cfg = config_from_dict({"data": {"benchmark": "cars196", "path": str(tmp_path)},
                            "scenario": {"increment": 20}, "train": {"epochs": 1}})
    assert cfg.data.source == "imagefolder" and cfg.data.num_classes == 196
    assert cfg.scenario.num_tasks == 10 and cfg.data.transform == "cub_cars"
    cfg = config_from_dict({"data": {"benchmark": "cifar100"}})
    assert cfg.data.hub_id == "uoft-cs/cifar100" and cfg.data.label_column == "fine_label"
    assert cfg.data.mean == [0.5071, 0.4867, 0.4408]
