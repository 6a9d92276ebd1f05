"""Watching a run: the per-step bar's numbers, the tracker values by hand, and TensorBoard event files read back."""
import pytest
import torch

from slca_kit.metrics import AccuracyMatrix
from slca_kit.monitor import EpochProgress, epoch_metrics, learning_rates, task_metrics
from slca_kit.resolve import config_from_dict
from slca_kit.trainer import Trainer

from conftest import tiny_recipe


def test_epoch_progress_keeps_the_running_mean_loss_and_counts_images_over_processes():
    progress = EpochProgress(3, "epoch 1", enabled=False, processes=2, rates={"head": 0.1, "backbone": 0.001})
    progress.update(1.0, 8)
    progress.update(2.0, 8)
    progress.update(6.0, 4)
    assert progress.rates == "lr head 0.1 backbone 0.001"
    assert progress.mean_loss == pytest.approx(3.0) and progress.steps == 3
    assert progress.images == (8 + 8 + 4) * 2
    progress.close()


def test_learning_rates_are_read_by_group_name():
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"name": "head", "params": [weights[0]], "lr": 0.01},
                                 {"name": "backbone", "params": [weights[1]], "lr": 0.001}], lr=0.5)
    assert learning_rates(optimizer) == {"head": 0.01, "backbone": 0.001}
    assert epoch_metrics(0.5, {"head": 0.01}) == {"train/loss": 0.5, "train/lr/head": 0.01}


def test_task_metrics_by_hand():
    matrix = AccuracyMatrix()
    matrix.add_row([8], [10])  # task 0: 80 %
    matrix.add_row([5, 9], [10, 10])  # after task 1: 50 % on task 0, 90 % on task 1
    record = {"seen_accuracy": 70.0, "seconds": {"train": 1.5, "evaluation": 0.25}}
    assert task_metrics(record, matrix) == {
        "accuracy/seen": 70.0, "accuracy/last_acc": 70.0, "accuracy/inc_acc": (80.0 + 70.0) / 2,
        "accuracy/task_0": 50.0, "accuracy/task_1": 90.0, "seconds/train": 1.5, "seconds/evaluation": 0.25}


def test_tensorboard_gets_loss_learning_rates_accuracy_rows_and_timings(tiny_npz, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(tiny_npz, tmp_path, method="seq_ft_sl",
                         train={"epochs": 2, "batch_size": 16, "lr": 0.05, "scheduler": "constant",
                                "log_with": ["tensorboard"]})
    results = Trainer(config_from_dict(recipe)).run()
    bars = capsys.readouterr().err
    assert "img/s" in bars and "loss " in bars and "lr head 0.05 backbone 0.0005" in bars  # the per-step bar

    # accelerate's TensorBoard tracker logs to RUN_DIR/NAME (the recipe's hyper-parameters in a sub-folder)
    accumulator = EventAccumulator(str(tmp_path / "tiny_seq_ft_sl" / "tiny_seq_ft_sl"))
    accumulator.Reload()
    scalars = {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
               for tag in accumulator.Tags()["scalars"]}
    # one loss value per epoch on one axis over the three tasks: steps 0..5
    assert [step for step, _ in scalars["train/loss"]] == list(range(6))
    assert all(value > 0 for _, value in scalars["train/loss"])
    assert [value for _, value in scalars["train/lr/head"]] == pytest.approx([0.05] * 6)
    assert [value for _, value in scalars["train/lr/backbone"]] == pytest.approx([0.0005] * 6)  # slow learner: x 0.01
    matrix = results["accuracy_matrix"]
    for task, row in enumerate(matrix):  # each task's row of the accuracy matrix, at step = task
        for j, accuracy in enumerate(row[:task + 1]):
            assert dict(scalars[f"accuracy/task_{j}"])[task] == pytest.approx(accuracy, abs=1e-4)
    assert scalars["accuracy/last_acc"][-1] == (2, pytest.approx(results["last_acc"], abs=1e-4))
    assert scalars["accuracy/inc_acc"][-1] == (2, pytest.approx(results["inc_acc"], abs=1e-4))
    assert [step for step, _ in scalars["seconds/train"]] == [0, 1, 2]
