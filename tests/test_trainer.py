"""End-to-end runs of every method on the tiny set, per-group lrs, SLCA statistics, checkpoint/resume."""
import json

import pytest
import timm
import torch

from slca_kit import checkpoint as ckpt
from slca_kit.resolve import config_from_dict
from slca_kit.methods import METHODS
from slca_kit.trainer import Trainer

from conftest import TINY_VIT, Interrupted, interrupt_after, interrupt_before_epoch, tiny_recipe


def _trainer(tiny_npz, tmp_path, method="slca", params=None, **sections):
    recipe = tiny_recipe(tiny_npz, tmp_path, method=method, **sections)
    recipe["method"]["params"] = params or {}
    return Trainer(config_from_dict(recipe))


# what some methods need on the tiny 2-block, 64-d ViT
NEEDS = {"slca_pp": {"adapter": {"type": "lora", "r": 4, "lora_alpha": 3.2, "train_backbone": ["norm", "bias"]}}}
TINY_PARAMS = {"dualprompt": {"g_layers": [0], "e_layers": [1], "e_pool_size": 3},
               "coda_prompt": {"pool_size": 6, "length": 4, "layers": [0, 1]},
               "ranpac": {"projection_dim": 64},  # M 10000: 17 solves of 10000 x 10000 a task (minutes on a CPU)
               "hide_prompt": {"e_layers": [0, 1], "centroids": 3, "ca_epochs": 2, "tii_epochs": 2}}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_end_to_end(tiny_npz, tmp_path, method):
    trainer = _trainer(tiny_npz, tmp_path, method=method, params=TINY_PARAMS.get(method), **NEEDS.get(method, {}))
    results = trainer.run()
    assert results["complete"] and len(results["accuracy_matrix"]) == 3
    assert results["totals"] == [12, 12, 12]
    assert 0 <= results["last_acc"] <= 100
    # methods that can use a task id also report task-incremental accuracy, the others do not
    assert (results["task_incremental"] is not None) == METHODS[method].needs_task_id
    run_dir = tmp_path / f"tiny_{method}"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["last_acc"] == results["last_acc"] and saved["complete"]
    for name in ("accuracy_matrix.csv", "accuracy_matrix.png", "accuracy_curve.png", "config.yaml"):
        assert (run_dir / name).stat().st_size > 0
    assert set(saved["tasks"][1]["seconds"]) >= {"evaluation"}
    assert saved["tasks"][0]["peak_memory_mib"] > 0
    # Accuracy does not depend on how the test set is batched (the run used eval_batch_size 32).
    ctx = trainer.context(2)
    trainer.config.train.eval_batch_size = 5
    assert trainer.evaluate(ctx) == (results["correct"][-1], results["totals"])
    group = trainer.method.evaluation_batch()
    assert saved["evaluation"]["batch"] == group
    if group is None:  # per-sample methods: the same logits whatever the batch
        images = torch.cat([batch for batch, _ in trainer.iterate_images(list(range(6)), "test", 36)])
        with torch.no_grad():
            whole = trainer.method.predict(trainer.model, images, ctx)
            pieces = torch.cat([trainer.method.predict(trainer.model, images[i:i + 5], ctx) for i in range(0, 36, 5)])
        assert torch.allclose(whole, pieces, atol=1e-4)


def test_batch_dependent_methods_are_evaluated_per_task_in_whole_batches():
    from slca_kit.evaluation import per_task_batches

    assert per_task_batches(7, 3, 0, 1) == [[0, 1, 2], [3, 4, 5], [6]]
    two = per_task_batches(7, 3, 0, 2) + per_task_batches(7, 3, 1, 2)
    assert sorted(two) == per_task_batches(7, 3, 0, 1)  # any number of processes: the same batches


def test_learns_the_first_task(tiny_npz, tmp_path):
    results = _trainer(tiny_npz, tmp_path, method="seq_ft", train={"epochs": 4}).run()
    assert results["accuracy_matrix"][0][0] >= 75.0  # 2 separable classes, chance is 50


def test_slow_learner_param_groups_reach_the_optimizer(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, method="seq_ft_sl", train={"lr": 0.02})
    trainer._add_heads_until(1)
    ctx = trainer.context(1)
    trainer.method.before_task(trainer.model, ctx)
    prepared = trainer._prepare_training(ctx, epochs=1)
    groups = {g["name"]: g for g in prepared["optimizer"].optimizer.param_groups}
    assert groups["head"]["lr"] == pytest.approx(0.02)
    assert groups["backbone"]["lr"] == pytest.approx(0.02 * 0.01)  # bcb_lrscale 1/100
    head_params = {id(p) for p in groups["head"]["params"]}
    # old head frozen and left out; only the current task's head trains
    assert head_params == {id(p) for p in trainer.model.head.heads[1].parameters()}
    assert len(groups["backbone"]["params"]) == len(list(trainer.model.backbone.parameters()))


def test_linear_probe_freezes_the_backbone(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, method="linear_probe")
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    trainer.run()
    after = trainer.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_joint_trains_on_every_seen_class(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, method="joint")
    assert trainer.method.training_classes(trainer.context(2)) == [0, 1, 2, 3, 4, 5]
    assert trainer.method.training_classes(trainer.context(0)) == [0, 1]


def test_slca_statistics_equal_direct_computation(tiny_npz, tmp_path):
    """Stored mean/covariance are torch.cov of the final backbone's test-transform features, + 1e-4 I."""
    trainer = _trainer(tiny_npz, tmp_path, train={"epochs": 1})
    trainer.run()
    means, covs = trainer.method.means, trainer.method.covs
    assert means.shape == (6, 64) and covs.shape == (6, 64, 64) and means.dtype == torch.float64
    # classes of the last task were measured with the final backbone
    classes = trainer.scenario.task_classes(2)
    features, labels = trainer.extract_features(classes, "train")
    for c in classes:
        own = features[labels == c].double()
        assert torch.allclose(means[c], own.mean(0), atol=1e-6)
        expected = torch.cov(own.T) + 1e-4 * torch.eye(64, dtype=torch.float64)
        assert torch.allclose(covs[c].double(), expected, atol=1e-5)
    assert len(trainer.method.alignment_losses) == 2  # alignment after tasks 1 and 2, not after task 0


def test_slca_restores_stage1_heads_unless_asked(tiny_npz, tmp_path):
    trainer = _trainer(tiny_npz, tmp_path, train={"epochs": 1})
    trainer.run()
    aligned = trainer.method.aligned_head.state_dict()
    stage1 = trainer.model.head.state_dict()
    assert not torch.equal(aligned["heads.0.weight"], stage1["heads.0.weight"])
    keep = _trainer(tiny_npz, tmp_path / "keep", train={"epochs": 1}, params={"keep_aligned_heads": True})
    keep.run()
    assert torch.equal(keep.method.aligned_head.state_dict()["heads.0.weight"],
                       keep.model.head.state_dict()["heads.0.weight"])


def test_resume_after_a_task_gives_the_same_matrix(tiny_npz, tmp_path):
    reference = _trainer(tiny_npz, tmp_path / "ref").run()
    interrupted = _trainer(tiny_npz, tmp_path / "cut")
    interrupt_after(interrupted, 0)
    with pytest.raises(Interrupted):
        interrupted.run()
    partial = json.loads((tmp_path / "cut" / "tiny_slca" / "results.json").read_text())
    assert not partial["complete"] and len(partial["accuracy_matrix"]) == 1
    resumed = _trainer(tiny_npz, tmp_path / "cut").run(resume=True)
    assert resumed["correct"] == reference["correct"]
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]


def test_resume_mid_task_from_an_epoch_checkpoint(tiny_npz, tmp_path):
    train = {"epochs": 3, "checkpoint_every_epoch": True, "keep_checkpoints": 10}
    reference_trainer = _trainer(tiny_npz, tmp_path / "ref", train=train, data={"transform": "cifar"})
    reference = reference_trainer.run()
    interrupted = _trainer(tiny_npz, tmp_path / "cut", train=train, data={"transform": "cifar"})
    interrupt_before_epoch(interrupted, task=1, epoch=2)
    with pytest.raises(Interrupted):
        interrupted.run()
    latest = ckpt.latest_checkpoint(tmp_path / "cut" / "tiny_slca" / "checkpoints")
    assert latest.name == "task_001_epoch_001"
    resumed_trainer = _trainer(tiny_npz, tmp_path / "cut", train=train, data={"transform": "cifar"})
    resumed = resumed_trainer.run(resume=True)
    assert resumed["correct"] == reference["correct"]
    for name, value in reference_trainer.model.state_dict().items():  # bitwise, augmentation included
        assert torch.equal(value, resumed_trainer.model.state_dict()[name]), name


def test_old_checkpoints_are_pruned(tiny_npz, tmp_path):
    _trainer(tiny_npz, tmp_path, train={"epochs": 1, "keep_checkpoints": 2}).run()
    names = [p.name for p in ckpt.complete_checkpoints(tmp_path / "tiny_slca" / "checkpoints")]
    assert names == ["task_001", "task_002"]


def test_gradient_accumulation_matches_full_batch(tiny_npz, tmp_path):
    """Two accumulated micro-batches of 8 take the same optimizer steps as batches of 16 (mean loss of equal
    halves), so the trained weights agree up to float rounding."""
    full = _trainer(tiny_npz, tmp_path / "a", method="seq_ft", train={"epochs": 2, "batch_size": 16})
    full.run()
    accumulated = _trainer(tiny_npz, tmp_path / "b", method="seq_ft",
                           train={"epochs": 2, "batch_size": 16, "gradient_accumulation_steps": 2})
    accumulated.run()
    assert accumulated.micro_batch == 8
    reference = full.model.state_dict()
    for name, value in accumulated.model.state_dict().items():
        assert torch.allclose(value, reference[name], atol=1e-4), name
    moved = full.model.backbone.blocks[0].attn.qkv.weight
    assert not torch.allclose(moved, _trainer(tiny_npz, tmp_path / "c").model.backbone.blocks[0].attn.qkv.weight)


def test_bf16_mixed_precision_runs_and_keeps_statistics_in_full_precision(tiny_npz, tmp_path):
    from accelerate.state import AcceleratorState

    fp32 = _trainer(tiny_npz, tmp_path / "fp32", train={"epochs": 2}).run()
    # accelerate keeps one process-wide state; a different precision in the same process needs a reset
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        trainer = _trainer(tiny_npz, tmp_path / "bf16", train={"epochs": 2, "mixed_precision": "bf16"})
        bf16 = trainer.run()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert bf16["complete"] and trainer.method.covs.dtype == torch.float32
    # same data, same seeds; bf16 rounding may flip a few of the 36 test predictions
    assert abs(bf16["last_acc"] - fp32["last_acc"]) <= 20


def test_same_seed_and_config_give_the_same_run(tiny_npz, tmp_path):
    first = _trainer(tiny_npz, tmp_path / "a", data={"transform": "cifar"})
    second = _trainer(tiny_npz, tmp_path / "b", data={"transform": "cifar"})
    assert first.run()["correct"] == second.run()["correct"]
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    assert torch.equal(first.method.covs, second.method.covs)


def test_results_record_provenance(tiny_npz, tmp_path):
    import hashlib
    import re

    import slca_kit
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT).state_dict(), str(weights))
    recipe = tiny_recipe(tiny_npz, tmp_path, method="seq_ft", train={"epochs": 0})
    recipe["backbone"]["weights"] = str(weights)
    results = Trainer(config_from_dict(recipe)).run()
    provenance = results["provenance"]
    assert provenance["slca_kit"] == slca_kit.__version__
    assert provenance["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", provenance["git_commit"])
    assert provenance["libraries"]["torch"] == torch.__version__.split("+")[0]
    assert provenance["backbone"] == {"timm_name": "vit_tiny_patch16_224", "pretrained_from_hub": False,
                                      "file": str(weights),
                                      "file_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert provenance["data"]["path"] == str(tiny_npz.resolve()) and provenance["data"]["split"] == "official"
    assert provenance["data"]["test_fingerprint"] == results["data_split"]["test_fingerprint"]
    assert (provenance["device"], provenance["num_processes"], provenance["mixed_precision"]) == ("cpu", 1, "no")
    fewer = tiny_recipe(tiny_npz, tmp_path / "fewer", method="seq_ft", train={"epochs": 0},
                        data={**recipe["data"], "max_train_per_class": 8})
    other = Trainer(config_from_dict(fewer)).provenance["data"]
    assert other["train_fingerprint"] != provenance["data"]["train_fingerprint"]
    assert other["test_fingerprint"] == provenance["data"]["test_fingerprint"]
