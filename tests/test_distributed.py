"""Two CPU processes with gloo (torchrun) against one process: class statistics reduce to the same values, no
test sample is counted twice, and a DDP training run completes."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from slca_kit import checkpoint as ckpt
from slca_kit.resolve import load_config
from slca_kit.trainer import Trainer

from conftest import make_color_images, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def odd_npz(tmp_path_factory):
    """7 test images per class: shards of 21 test images per task are uneven (11 + 10)."""
    train_x, train_y = make_color_images(6, 15, seed=1)
    test_x, test_y = make_color_images(6, 7, seed=2)
    path = tmp_path_factory.mktemp("odd") / "odd.npz"
    np.savez(path, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    return path


def _train(recipe_path, processes, *overrides, cwd):
    """One process runs in this one (the same Trainer the CLI builds, without a second interpreter's start-up);
    more run under torchrun."""
    if processes == 1:
        Trainer(load_config(recipe_path, list(overrides))).run()
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--standalone", "-m", "slca_kit", "train"]
    done = subprocess.run(command + [str(recipe_path), *overrides], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _final_state(run_dir):
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    return torch.load(latest / "custom_checkpoint_0.pkl", weights_only=False)


def _one_and_two_processes(recipe_path, tmp_path):
    """The final states of the recipe run with the backbone as built (epochs=0) on one and on two processes."""
    _train(recipe_path, 1, "name=one", "train.epochs=0", cwd=tmp_path)
    _train(recipe_path, 2, "name=two", "train.epochs=0", cwd=tmp_path)
    return _final_state(tmp_path / "runs" / "one"), _final_state(tmp_path / "runs" / "two")


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not available")
def test_two_processes_match_one(odd_npz, tmp_path):
    recipe = tiny_recipe(odd_npz, tmp_path / "runs", scenario={"increment": 3, "class_order_seed": 1993})
    path = write_recipe(tmp_path / "odd.yaml", recipe)
    # epochs=0: the backbone stays as built, so statistics depend only on how features are sharded and reduced
    one, two = _one_and_two_processes(path, tmp_path)
    assert torch.allclose(one["method"]["means"], two["method"]["means"], atol=1e-9)
    assert torch.allclose(one["method"]["covs"], two["method"]["covs"], atol=1e-6)
    assert one["matrix"]["totals"] == two["matrix"]["totals"] == [21, 21]  # uneven shards, each sample once
    assert one["matrix"]["correct"] == two["matrix"]["correct"]

    _train(path, 2, "name=trained", "train.epochs=1", cwd=tmp_path)
    results = json.loads((tmp_path / "runs" / "trained" / "results.json").read_text())
    assert results["complete"] and results["num_processes"] == 2 and results["totals"] == [21, 21]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not available")
@pytest.mark.parametrize("method", ["ewc", "replay", "den"])
def test_lifelong_state_is_the_same_with_two_processes(odd_npz, tmp_path, method):
    """EWC's Fisher is reduced, the replay buffer and DEN's training data are gathered: with the backbone as built
    (epochs=0), two processes end with one process's state."""
    recipe = tiny_recipe(odd_npz, tmp_path / "runs", method=method, scenario={"increment": 3, "class_order_seed": 1993})
    recipe["method"]["params"] = {"memory_size": 8} if method == "replay" else {"epochs": 2} if method == "den" else {}
    path = write_recipe(tmp_path / f"{method}.yaml", recipe)
    one, two = _one_and_two_processes(path, tmp_path)
    assert one["matrix"] == two["matrix"] and one["task_matrix"] == two["task_matrix"]
    if method == "ewc":
        for name, fisher in one["method"]["importance"].items():
            assert torch.allclose(fisher, two["method"]["importance"][name], rtol=1e-5, atol=1e-12), name
    if method == "replay":
        assert one["method"]["exemplars"] == two["method"]["exemplars"]
        assert sum(len(v) for v in one["method"]["exemplars"].values()) == 6  # 8 // 6 seen classes = 1 each
    if method == "den":
        assert one["method"]["history"] == two["method"]["history"]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not available")
def test_batch_wise_prompt_selection_gives_the_same_accuracy_with_two_processes(odd_npz, tmp_path):
    """L2P votes prompts over each test batch: per-task batches of 4 (21 test images per task: 6 batches, shared
    3 + 3 over two processes) give one process's counts whatever the evaluation batch size."""
    recipe = tiny_recipe(odd_npz, tmp_path / "runs", method="l2p", scenario={"increment": 3, "class_order_seed": 1993})
    recipe["method"]["params"] = {"pool_size": 4, "length": 2, "top_k": 2, "test_batch_size": 4}
    path = write_recipe(tmp_path / "l2p.yaml", recipe)
    _train(path, 1, "name=one", "train.epochs=0", "train.eval_batch_size=64", cwd=tmp_path)
    _train(path, 2, "name=two", "train.epochs=0", "train.eval_batch_size=3", cwd=tmp_path)
    one, two = (json.loads((tmp_path / "runs" / name / "results.json").read_text()) for name in ("one", "two"))
    assert one["correct"] == two["correct"] and one["totals"] == two["totals"] == [21, 21]
    assert one["evaluation"] == two["evaluation"] and one["evaluation"]["batch"] == 4


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not available")
def test_a_transformers_backbone_trains_with_two_processes(odd_npz, tmp_path):
    """DINOv2 from a local folder under DDP: statistics of the backbone as built equal one process's, and training
    runs (its mask token, unused by the feature, is frozen, so DDP finds no parameter without a gradient)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8)).save_pretrained(tmp_path / "dinov2")
    recipe = tiny_recipe(odd_npz, tmp_path / "runs", scenario={"increment": 3, "class_order_seed": 1993})
    recipe["backbone"] = {"source": "transformers", "name": str(tmp_path / "dinov2")}
    path = write_recipe(tmp_path / "dinov2.yaml", recipe)
    one, two = _one_and_two_processes(path, tmp_path)
    assert torch.allclose(one["method"]["means"], two["method"]["means"], atol=1e-6)
    assert torch.allclose(one["method"]["covs"], two["method"]["covs"], atol=1e-5)
    assert one["matrix"]["correct"] == two["matrix"]["correct"]
    _train(path, 2, "name=trained", "train.epochs=1", cwd=tmp_path)
    results = json.loads((tmp_path / "runs" / "trained" / "results.json").read_text())
    assert results["complete"] and results["num_processes"] == 2 and results["totals"] == [21, 21]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not available")
def test_ranpac_gram_and_ridge_readout_are_the_same_with_two_processes(odd_npz, tmp_path):
    """RanPAC's G and Q come from features gathered in split order: two processes end with one process's G, Q,
    ridges and readout; its first session (adapters + cosine head) trains under DDP."""
    recipe = tiny_recipe(odd_npz, tmp_path / "runs", method="ranpac",
                         scenario={"increment": 3, "class_order_seed": 1993}, backbone={"replace_final_norm": False})
    recipe["method"]["params"] = {"projection_dim": 40, "adapter_bottleneck": 4}
    path = write_recipe(tmp_path / "ranpac.yaml", recipe)
    one, two = _one_and_two_processes(path, tmp_path)
    assert one["method"]["chosen_ridges"] == two["method"]["chosen_ridges"]
    for key in ("gram", "class_sums", "readout"):
        assert torch.allclose(one["method"][key], two["method"][key], rtol=1e-5, atol=1e-5), key
    assert one["matrix"] == two["matrix"]
    _train(path, 2, "name=trained", "train.epochs=1", cwd=tmp_path)
    results = json.loads((tmp_path / "runs" / "trained" / "results.json").read_text())
    assert results["complete"] and results["num_processes"] == 2


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not available")
def test_fecam_class_statistics_are_the_same_with_two_processes(odd_npz, tmp_path):
    recipe = tiny_recipe(odd_npz, tmp_path / "runs", method="fecam",
                         scenario={"increment": 3, "class_order_seed": 1993})
    path = write_recipe(tmp_path / "fecam.yaml", recipe)
    one, two = _one_and_two_processes(path, tmp_path)
    assert torch.allclose(one["method"]["means"], two["method"]["means"], atol=1e-6)
    assert torch.allclose(one["method"]["precisions"], two["method"]["precisions"], rtol=1e-4, atol=1e-3)
    assert one["matrix"] == two["matrix"]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not available")
def test_aper_ease_mos_prototypes_and_cofima_statistics_are_the_same_with_two_processes(odd_npz, tmp_path):
    """APER's, EASE's and MOS's prototype sums, MOS's class moments and CoFiMA's (after its Fisher averaging, whose
    batches are split over the processes) reduce to one process's values."""
    for method, params in (("aper", {"adapter_bottleneck": 4}), ("ease", {"adapter_bottleneck": 4}),
                           ("mos", {"adapter_bottleneck": 4, "ca_epochs": 1, "samples_per_class": 8}),
                           ("cofima", {"ca_epochs": 1, "samples_per_class": 8})):
        work = tmp_path / method
        work.mkdir()
        recipe = tiny_recipe(odd_npz, work / "runs", method=method, scenario={"increment": 3, "class_order_seed": 1993})
        recipe["method"]["params"] = params
        path = write_recipe(work / f"{method}.yaml", recipe)
        one, two = _one_and_two_processes(path, work)
        keys = {"cofima": ["means"], "mos": ["prototypes", "means", "covs"]}.get(method, ["prototypes"])
        for key in keys:
            assert torch.allclose(one["method"][key].double(), two["method"][key].double(), atol=1e-5), (method, key)
        assert one["matrix"] == two["matrix"], method


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not available")
def test_hide_prompt_task_identity_training_and_statistics_are_the_same_with_two_processes(odd_npz, tmp_path):
    """The task-identity classifier trains on shares of each batch with gradients summed by hand (batches of 11 of a
    task's 45 images: the last batch of 1 leaves the second process an empty share); k-means runs on features
    gathered on every process."""
    recipe = tiny_recipe(odd_npz, tmp_path / "runs", method="hide_prompt",
                         scenario={"increment": 3, "class_order_seed": 1993}, backbone={"replace_final_norm": False})
    recipe["method"]["params"] = {"e_layers": [0, 1], "centroids": 3, "ca_epochs": 1, "tii_epochs": 2,
                                  "tii_batch_size": 11, "tii_lr": 0.01, "ca_samples_per_centroid": 8}
    path = write_recipe(tmp_path / "hide_prompt.yaml", recipe)
    one, two = _one_and_two_processes(path, tmp_path)
    assert np.allclose(one["method"]["identity_losses"], two["method"]["identity_losses"], rtol=1e-4)
    for key in ("prompt_statistics", "identity_statistics"):
        assert torch.allclose(one["method"][key]["means"], two["method"][key]["means"], atol=1e-5), key
    assert one["matrix"] == two["matrix"]


def test_an_fsdp_launch_is_refused_with_one_error_line_before_any_work(tiny_npz, tmp_path, monkeypatch, capsys):
    """``accelerate launch --use_fsdp`` sets ACCELERATE_USE_FSDP for the processes it starts; FSDP would shard what
    the methods hook into."""
    from slca_kit import cli

    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_npz, tmp_path / "runs"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert cli.main(["train", str(recipe)]) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "FSDP is not supported" in errors[0] and "Supported: one process, DDP" in errors[0]
    assert "Traceback" not in stderr and not (tmp_path / "runs").exists()  # nothing was started


def test_only_one_process_and_ddp_are_accepted():
    from accelerate.utils import DistributedType

    from slca_kit.errors import ConfigError
    from slca_kit.parallelism import refuse_sharded_launch, refuse_sharded_state

    for accepted in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        refuse_sharded_state(accepted)
    for refused, engine in ((DistributedType.FSDP, "FSDP"), (DistributedType.DEEPSPEED, "DeepSpeed"),
                            (DistributedType.MEGATRON_LM, "Megatron-LM")):
        with pytest.raises(ConfigError, match=f"{engine} is not supported"):
            refuse_sharded_state(refused)
    refuse_sharded_launch({"ACCELERATE_USE_FSDP": "false"})
    # without the check, accelerate fails with a traceback where DeepSpeed is not installed
    with pytest.raises(ConfigError, match="DeepSpeed is not supported"):
        refuse_sharded_launch({"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(ConfigError, match="ACCELERATE_USE_MEGATRON_LM=1"):
        refuse_sharded_launch({"ACCELERATE_USE_MEGATRON_LM": "1"})
