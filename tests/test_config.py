"""Recipe loading: overrides, extends, environment variables in paths, benchmark presets."""
import pytest

from slca_kit.config import apply_overrides, load_recipe_dict
from slca_kit.resolve import config_from_dict
from slca_kit.errors import ConfigError

from conftest import tiny_recipe, write_recipe


def test_valid_recipe_resolves_method_params(tiny_npz, tmp_path):
    cfg = config_from_dict(tiny_recipe(tiny_npz, tmp_path))
    assert cfg.method.params.ca_epochs == 5 and cfg.method.params.logit_norm_tau == 0.1
    assert cfg.train.milestones == [18] and cfg.scenario.class_order_seed == 1993


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


def test_the_config_layer_imports_neither_data_nor_methods():
    """Presets and method parameters are resolved one layer up (slca_kit.resolve)."""
    import ast
    from pathlib import Path

    import slca_kit.config

    tree = ast.parse(Path(slca_kit.config.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] in ("data", "methods")], imported
