"""Two CPU processes with gloo (torchrun) against one process: class statistics reduce to the same values, no
test sample is counted twice, and DDP training runs complete. The two-process runs of every test share one torchrun
launch (the ``two_processes`` fixture); the one-process runs happen in this process."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

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


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]


def _base(npz, runs):
    return tiny_recipe(npz, runs, scenario={"increment": 3, "class_order_seed": 1993})


def _with(method, params, **sections):
    def build(npz, runs):
        recipe = tiny_recipe(npz, runs, method=method, scenario={"increment": 3, "class_order_seed": 1993}, **sections)
        recipe["method"]["params"] = params
        return recipe
    return build


def _dinov2(npz, runs):
    recipe = _base(npz, runs)
    recipe["backbone"] = {"source": "transformers", "name": str(runs.parent / "dinov2")}
    return recipe


# Every recipe below runs on two processes with the backbone as built (epochs=0, so class statistics depend only
# on how features are sharded and reduced); the marked ones also train an epoch under DDP.
RECIPES = {
    "slca": _base,
    "ewc": _with("ewc", {}), "replay": _with("replay", {"memory_size": 8}), "den": _with("den", {"epochs": 2}),
    "l2p": _with("l2p", {"pool_size": 4, "length": 2, "top_k": 2, "test_batch_size": 4}),
    "dinov2": _dinov2,
    "ranpac": _with("ranpac", {"projection_dim": 40, "adapter_bottleneck": 4}, backbone={"replace_final_norm": False}),
    "fecam": _with("fecam", {}),
    "aper": _with("aper", {"adapter_bottleneck": 4}), "ease": _with("ease", {"adapter_bottleneck": 4}),
    "mos": _with("mos", {"adapter_bottleneck": 4, "ca_epochs": 1, "samples_per_class": 8}),
    "cofima": _with("cofima", {"ca_epochs": 1, "samples_per_class": 8}),
    "hide_prompt": _with("hide_prompt", {"e_layers": [0, 1], "centroids": 3, "ca_epochs": 1, "tii_epochs": 2,
                                         "tii_batch_size": 11, "tii_lr": 0.01, "ca_samples_per_centroid": 8},
                         backbone={"replace_final_norm": False}),
}
TRAINED = ("dinov2", "ranpac")
TWO_PROCESS_OVERRIDES = {"l2p": ["train.eval_batch_size=3"]}


@pytest.fixture(scope="module")
def two_processes(odd_npz, tmp_path_factory):
    """Every recipe of RECIPES written under its own folder and run on two processes in one torchrun launch
    (tests/ddp_jobs.py). Returns {name: recipe path}; the runs are in the recipe's folder, runs/two (runs/trained)."""
    if not torch.distributed.is_gloo_available():
        pytest.skip("gloo backend not available")
    root = tmp_path_factory.mktemp("ddp")
    paths, jobs = {}, []
    for name, build in RECIPES.items():
        if name == "dinov2":
            if importlib.util.find_spec("transformers") is None:
                continue
            import transformers

            torch.manual_seed(0)
            transformers.Dinov2Model(transformers.Dinov2Config(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8)).save_pretrained(root / name / "dinov2")
        (root / name).mkdir(exist_ok=True)
        paths[name] = write_recipe(root / name / f"{name}.yaml", build(odd_npz, root / name / "runs"))
        jobs.append([str(paths[name]), "name=two", "train.epochs=0", *TWO_PROCESS_OVERRIDES.get(name, [])])
        if name in TRAINED:
            jobs.append([str(paths[name]), "name=trained", "train.epochs=1"])
    (root / "jobs.json").write_text(json.dumps(jobs))
    script = Path(__file__).with_name("ddp_jobs.py")
    done = subprocess.run(TORCHRUN + [str(script), str(root / "jobs.json")], cwd=root, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return paths


def _final_state(run_dir):
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    return torch.load(latest / "custom_checkpoint_0.pkl", weights_only=False)


def _one_and_two_processes(paths, name, *overrides):
    """The final states of recipe ``name`` with the backbone as built on one process (run here) and on two."""
    Trainer(load_config(paths[name], ["name=one", "train.epochs=0", *overrides])).run()
    runs = paths[name].parent / "runs"
    return _final_state(runs / "one"), _final_state(runs / "two")


def _results(paths, name, run):
    return json.loads((paths[name].parent / "runs" / run / "results.json").read_text())


def test_two_processes_match_one(two_processes):
    one, two = _one_and_two_processes(two_processes, "slca")
    assert torch.allclose(one["method"]["means"], two["method"]["means"], atol=1e-9)
    assert torch.allclose(one["method"]["covs"], two["method"]["covs"], atol=1e-6)
    assert one["matrix"]["totals"] == two["matrix"]["totals"] == [21, 21]  # uneven shards, each sample once
    assert one["matrix"]["correct"] == two["matrix"]["correct"]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not available")
def test_the_cli_trains_several_seeds_in_one_launch(odd_npz, tmp_path):
    """``slca train RECIPE --seeds`` under torchrun: each run trains under DDP, and the process group outlives the
    first run (it used to be destroyed at the end of every run, so the second seed failed)."""
    path = write_recipe(tmp_path / "odd.yaml", _base(odd_npz, tmp_path / "runs"))
    done = subprocess.run(TORCHRUN + ["-m", "slca_kit", "train", str(path), "train.epochs=1", "--seeds", "1", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for seed in (1, 2):
        results = json.loads((tmp_path / "runs" / f"tiny_slca_seed{seed}" / "results.json").read_text())
        assert results["complete"] and results["num_processes"] == 2 and results["totals"] == [21, 21]
        assert results["config"]["scenario"]["class_order_seed"] == seed


@pytest.mark.parametrize("method", ["ewc", "replay", "den"])
def test_lifelong_state_is_the_same_with_two_processes(two_processes, method):
    """EWC's Fisher is reduced, the replay buffer and DEN's training data are gathered: with the backbone as built
    (epochs=0), two processes end with one process's state."""
    one, two = _one_and_two_processes(two_processes, method)
    assert one["matrix"] == two["matrix"] and one["task_matrix"] == two["task_matrix"]
    if method == "ewc":
        for name, fisher in one["method"]["importance"].items():
            assert torch.allclose(fisher, two["method"]["importance"][name], rtol=1e-5, atol=1e-12), name
    if method == "replay":
        assert one["method"]["exemplars"] == two["method"]["exemplars"]
        assert sum(len(v) for v in one["method"]["exemplars"].values()) == 6  # 8 // 6 seen classes = 1 each
    if method == "den":
        assert one["method"]["history"] == two["method"]["history"]


def test_batch_wise_prompt_selection_gives_the_same_accuracy_with_two_processes(two_processes):
    """L2P votes prompts over each test batch: per-task batches of 4 (21 test images per task: 6 batches, shared
    3 + 3 over two processes) give one process's counts whatever the evaluation batch size (64 here, 3 there)."""
    _one_and_two_processes(two_processes, "l2p", "train.eval_batch_size=64")
    one, two = (_results(two_processes, "l2p", run) for run in ("one", "two"))
    assert one["correct"] == two["correct"] and one["totals"] == two["totals"] == [21, 21]
    assert one["evaluation"] == two["evaluation"] and one["evaluation"]["batch"] == 4


def test_a_transformers_backbone_trains_with_two_processes(two_processes):
    """DINOv2 from a local folder under DDP: statistics of the backbone as built equal one process's, and training
    runs (its mask token, unused by the feature, is frozen, so DDP finds no parameter without a gradient)."""
    if "dinov2" not in two_processes:
        pytest.skip("transformers is not installed")
    one, two = _one_and_two_processes(two_processes, "dinov2")
    assert torch.allclose(one["method"]["means"], two["method"]["means"], atol=1e-6)
    assert torch.allclose(one["method"]["covs"], two["method"]["covs"], atol=1e-5)
    assert one["matrix"]["correct"] == two["matrix"]["correct"]
    results = _results(two_processes, "dinov2", "trained")
    assert results["complete"] and results["num_processes"] == 2 and results["totals"] == [21, 21]


def test_ranpac_gram_and_ridge_readout_are_the_same_with_two_processes(two_processes):
    """RanPAC's G and Q come from features gathered in split order: two processes end with one process's G, Q,
    ridges and readout; its first session (adapters + cosine head) trains under DDP."""
    one, two = _one_and_two_processes(two_processes, "ranpac")
    assert one["method"]["chosen_ridges"] == two["method"]["chosen_ridges"]
    for key in ("gram", "class_sums", "readout"):
        assert torch.allclose(one["method"][key], two["method"][key], rtol=1e-5, atol=1e-5), key
    assert one["matrix"] == two["matrix"]
    results = _results(two_processes, "ranpac", "trained")
    assert results["complete"] and results["num_processes"] == 2


def test_fecam_class_statistics_are_the_same_with_two_processes(two_processes):
    one, two = _one_and_two_processes(two_processes, "fecam")
    assert torch.allclose(one["method"]["means"], two["method"]["means"], atol=1e-6)
    assert torch.allclose(one["method"]["precisions"], two["method"]["precisions"], rtol=1e-4, atol=1e-3)
    assert one["matrix"] == two["matrix"]


@pytest.mark.parametrize("method", ["aper", "ease", "mos", "cofima"])
def test_aper_ease_mos_prototypes_and_cofima_statistics_are_the_same_with_two_processes(two_processes, method):
    """APER's, EASE's and MOS's prototype sums, MOS's class moments and CoFiMA's (after its Fisher averaging, whose
    batches are split over the processes) reduce to one process's values."""
    one, two = _one_and_two_processes(two_processes, method)
    keys = {"cofima": ["means"], "mos": ["prototypes", "means", "covs"]}.get(method, ["prototypes"])
    for key in keys:
        assert torch.allclose(one["method"][key].double(), two["method"][key].double(), atol=1e-5), (method, key)
    assert one["matrix"] == two["matrix"], method


def test_hide_prompt_task_identity_training_and_statistics_are_the_same_with_two_processes(two_processes):
    """The task-identity classifier trains on shares of each batch with gradients summed by hand (batches of 11 of a
    task's 45 images: the last batch of 1 leaves the second process an empty share); k-means runs on features
    gathered on every process."""
    one, two = _one_and_two_processes(two_processes, "hide_prompt")
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
