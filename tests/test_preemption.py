"""SIGTERM / SIGINT stop a run at the next optimizer step with a checkpoint, and --resume from it equals a run that
was never stopped; one writer per run folder; --resume refuses a changed recipe unless told to record it."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from slca_kit import checkpoint as ckpt
from slca_kit.resolve import config_from_dict
from slca_kit.errors import ConfigError, CheckpointError, Preempted, RunFolderBusy
from slca_kit.run_folder import LOCK_FILE, RunLock, config_differences
from slca_kit.trainer import Trainer

from conftest import Interrupted, interrupt_after, make_color_images, tiny_recipe, write_recipe


def _recipe(tiny_npz, root, name, **train):
    # 32 training images per task in batches of 8: 4 optimizer steps per epoch; random augmentation on, to show
    # that a resumed epoch continues its sample order and augmentation exactly.
    return tiny_recipe(tiny_npz, root, name=name, data={"transform": "cifar"},
                       train={"epochs": 2, "batch_size": 8, **train})


def _signal_at(trainer, number, task, optimizer_step, times=1):
    """Send ``number`` to this very process ``times`` times after the ``optimizer_step``-th update of ``task``."""
    original = trainer.method.after_optimizer_step
    seen = {"steps": 0}

    def after_optimizer_step(model, ctx):
        original(model, ctx)
        if ctx.task == task:
            seen["steps"] += 1
            if seen["steps"] == optimizer_step:
                for _ in range(times):
                    os.kill(os.getpid(), number)

    trainer.method.after_optimizer_step = after_optimizer_step


def _weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / "task_002" / "model.safetensors"))


# (signal, gradient accumulation, optimizer step of task 1 it follows, expected checkpoint)
STOPS = [
    (signal.SIGTERM, 1, 2, "task_001_epoch_000_step_000001"),  # mid-epoch
    (signal.SIGINT, 2, 3, "task_001_epoch_000_step_000005"),  # micro-batches 4, 5 made the 3rd update
    (signal.SIGTERM, 1, 4, "task_001_epoch_000_step_000003"),  # the epoch's last step: resume skips it whole
]


@pytest.mark.parametrize("number, accumulation, step, name", STOPS, ids=["sigterm", "sigint-accumulation", "last"])
def test_signal_stops_after_the_step_and_resume_is_exact(number, accumulation, step, name, tiny_npz, tmp_path):
    reference = Trainer(config_from_dict(_recipe(tiny_npz, tmp_path, "reference",
                                                 gradient_accumulation_steps=accumulation))).run()
    recipe = _recipe(tiny_npz, tmp_path, "stopped", gradient_accumulation_steps=accumulation)
    trainer = Trainer(config_from_dict(recipe))
    _signal_at(trainer, number, task=1, optimizer_step=step)
    with pytest.raises(Preempted) as info:
        trainer.run()
    run_dir = tmp_path / "stopped"
    assert info.value.signal_number == number
    assert str(info.value) == (f"stopped by {signal.Signals(number).name} task 1, epoch 0, step "
                               f"{int(name[-6:])}; checkpoint {run_dir / 'checkpoints' / name} is complete")
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == name
    assert ckpt.read_progress(run_dir / "checkpoints" / name)["step"] == int(name[-6:])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are put back
    resumed = Trainer(config_from_dict(recipe)).run(resume=True)
    assert resumed["correct"] == reference["correct"]
    reference_weights, resumed_weights = _weights(tmp_path / "reference"), _weights(run_dir)
    for key, value in reference_weights.items():
        assert torch.equal(resumed_weights[key], value), key


def test_signal_during_alignment_stops_after_the_task_checkpoint(tiny_npz, tmp_path):
    """Statistics and alignment cannot be checkpointed half-way: the task finishes, then the run stops."""
    recipe = _recipe(tiny_npz, tmp_path, "aligning")
    trainer = Trainer(config_from_dict(recipe))
    original = trainer.method._align

    def align(model, ctx):
        os.kill(os.getpid(), signal.SIGTERM)
        original(model, ctx)

    trainer.method._align = align
    with pytest.raises(Preempted, match=r"stopped by SIGTERM after task 1; checkpoint .*task_001 is complete"):
        trainer.run()
    results = json.loads((tmp_path / "aligning" / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 2 and not results["complete"]
    assert Trainer(config_from_dict(recipe)).run(resume=True)["complete"]


def test_a_second_signal_stops_at_once_and_releases_the_folder(tiny_npz, tmp_path):
    recipe = _recipe(tiny_npz, tmp_path, "impatient")
    trainer = Trainer(config_from_dict(recipe))
    _signal_at(trainer, signal.SIGINT, task=0, optimizer_step=1, times=2)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert ckpt.latest_checkpoint(tmp_path / "impatient" / "checkpoints") is None
    assert Trainer(config_from_dict(recipe)).run()["complete"]  # the lock went with the interrupted run


@pytest.mark.parametrize("group, marker", [(False, "task 2: train"), (True, "task 2: statistics")],
                         ids=["to-the-process-in-training", "to-the-group-in-statistics"])
def test_sigterm_to_a_real_process_names_the_resume_command(group, marker, tiny_npz, tmp_path):
    """SIGTERM to the process, during training; then to the whole process group, as Slurm's scancel sends it,
    during class statistics (150 images per class in batches of 2, so that it lands there): the data-loader worker
    gets it too and must keep serving the batches the task needs before its checkpoint (a worker that died of it
    would stop the run with "DataLoader worker exited unexpectedly")."""
    data = tiny_npz
    if group:
        data = tmp_path / "larger.npz"
        (x, y), (tx, ty) = make_color_images(6, 150, seed=1), make_color_images(6, 6, seed=2)
        np.savez(data, train_x=x, train_y=y, test_x=tx, test_y=ty)
    recipe = _recipe(data, tmp_path / "runs", "real", epochs=1 if group else 6, eval_batch_size=2)
    recipe["data"]["num_workers"] = 1 if group else 0
    path = write_recipe(tmp_path / "real.yaml", recipe)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "slca_kit", "train", str(path)], cwd=tmp_path,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                               start_new_session=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if marker in line:
            if group:
                time.sleep(0.15)  # the statistics loader forks its worker after the marker is logged
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.send_signal(signal.SIGTERM)
            break
    lines += process.stderr.readlines()
    process.wait(timeout=120)
    output = "".join(lines)
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "stopped by SIGTERM" in output and "Traceback" not in output
    assert f"continue with: slca train {path} --resume" in output
    resumed = subprocess.run([sys.executable, "-m", "slca_kit", "train", str(path), "--resume"], cwd=tmp_path,
                             capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference_recipe = {**recipe, "name": "reference"}
    reference = Trainer(config_from_dict(reference_recipe)).run()
    real = json.loads((tmp_path / "runs" / "real" / "results.json").read_text())
    assert real["correct"] == reference["correct"]


LAUNCH = textwrap.dedent("""
    import os, signal, sys
    from slca_kit import cli
    from slca_kit.trainer import Trainer

    run = Trainer.run
    def run_with_signal(self, *args, **kwargs):
        original, steps = self.method.after_optimizer_step, []
        def after_optimizer_step(model, ctx):  # only rank 1 is told to stop, at its 2nd update of task 1
            original(model, ctx)
            steps.append(ctx.task)
            if self.accelerator.process_index == 1 and steps.count(1) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        self.method.after_optimizer_step = after_optimizer_step
        return run(self, *args, **kwargs)
    Trainer.run = run_with_signal
    sys.exit(cli.main(["train", *sys.argv[1:]]))
""")


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not available")
def test_under_ddp_every_process_stops_at_the_same_step(tiny_npz, tmp_path):
    path = write_recipe(tmp_path / "ddp.yaml", _recipe(tiny_npz, tmp_path / "runs", "ddp"))
    (tmp_path / "launch.py").write_text(LAUNCH)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(tmp_path / "launch.py"), str(path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    stops = [line for line in done.stderr.splitlines() if "stopped by SIGTERM" in line]
    # 32 images per task, 8 per update over 2 processes: micro-batches of 4, the 2nd update is step 1 on both.
    assert len(stops) == 2 and all("task 1, epoch 0, step 1;" in line for line in stops), done.stderr[-3000:]
    assert ckpt.latest_checkpoint(tmp_path / "runs" / "ddp" / "checkpoints").name == "task_001_epoch_000_step_000001"


# -- one writer per run folder ------------------------------------------------------------------------------------
HOLD = ("import sys, time; from slca_kit.run_folder import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
        "print('held', flush=True); time.sleep(120)")


def test_a_folder_written_by_a_live_process_is_refused_and_a_stale_lock_taken_over(tiny_npz, tmp_path, caplog):
    recipe = _recipe(tiny_npz, tmp_path, "shared", epochs=1)
    run_dir = tmp_path / "shared"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for resume in (False, True):
            with pytest.raises(RunFolderBusy, match=rf"{run_dir} is being written by pid {holder.pid} on "):
                Trainer(config_from_dict(recipe)).run(resume=resume)
    finally:
        holder.kill()
        holder.wait()
    assert f"pid {holder.pid}" in (run_dir / LOCK_FILE).read_text()  # left behind by the killed process
    with caplog.at_level("WARNING", logger="slca_kit"):
        assert Trainer(config_from_dict(recipe)).run()["complete"]
    assert f"took over a stale lock of a process that no longer runs (pid {holder.pid} on" in caplog.text
    assert (run_dir / LOCK_FILE).read_text() == ""  # released at the end


def test_the_lock_is_held_while_training(tiny_npz, tmp_path):
    trainer = Trainer(config_from_dict(_recipe(tiny_npz, tmp_path, "held", epochs=1)))
    original, seen = trainer.method.after_training, []

    def after_training(model, ctx):
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "held").acquire()
        seen.append(ctx.task)
        original(model, ctx)

    trainer.method.after_training = after_training
    trainer.run()
    assert seen == [0, 1, 2]


# -- resume with a changed recipe ---------------------------------------------------------------------------------
def _first_task_only(recipe):
    trainer = Trainer(config_from_dict(recipe))
    interrupt_after(trainer, 0)
    with pytest.raises(Interrupted):
        trainer.run()


def test_resume_refuses_a_changed_recipe_unless_allowed_and_records_it(tiny_npz, tmp_path):
    recipe = _recipe(tiny_npz, tmp_path, "changed", epochs=1)
    _first_task_only(recipe)
    other = {**recipe, "train": {**recipe["train"], "lr": 0.1}, "method": {"name": "slca", "params": {"ca_epochs": 2}}}
    with pytest.raises(ConfigError) as info:
        Trainer(config_from_dict(other)).run(resume=True)
    message = str(info.value)
    assert "--resume: the recipe differs from the one this run started with" in message and "\n" not in message
    assert "method.params.ca_epochs: 5 -> 2; train.lr: 0.05 -> 0.1;" in message
    assert "--allow-config-change" in message
    results = Trainer(config_from_dict(other)).run(resume=True, allow_config_change=True)
    assert results["complete"]
    (change,) = results["config_changes"]
    assert change["resumed_from"] == "task_000"
    assert change["changed"] == {"method.params.ca_epochs": {"before": 5, "after": 2},
                                 "train.lr": {"before": 0.05, "after": 0.1}}
    stored = json.loads((tmp_path / "changed" / "results.json").read_text())
    assert stored["config_changes"] == results["config_changes"] and stored["config"]["train"]["lr"] == 0.1


def test_resume_accepts_changes_that_cannot_change_results(tiny_npz, tmp_path):
    recipe = _recipe(tiny_npz, tmp_path, "neutral", epochs=1)
    _first_task_only(recipe)
    recipe["train"].update(keep_checkpoints=5, checkpoint_every_epoch=True)
    recipe["data"]["num_workers"] = 1
    assert Trainer(config_from_dict(recipe)).run(resume=True)["config_changes"] == []


def test_resume_with_other_task_sizes_is_refused_twice(tiny_npz, tmp_path):
    recipe = _recipe(tiny_npz, tmp_path, "sizes", epochs=1)
    _first_task_only(recipe)
    other = {**recipe, "scenario": {**recipe["scenario"], "increment": 3}}
    with pytest.raises(ConfigError, match=r"scenario.increment: 2 -> 3"):
        Trainer(config_from_dict(other)).run(resume=True)
    with pytest.raises(CheckpointError, match=r"head sizes \[2\] do not match this recipe's tasks \[3, 3\]"):
        Trainer(config_from_dict(other)).run(resume=True, allow_config_change=True)


def test_config_differences_by_hand():
    stored = {"name": "a", "train": {"lr": 0.1, "log_with": []}, "method": {"params": {"x": 1}}}
    current = {"name": "b", "train": {"lr": 0.1, "log_with": ["tensorboard"], "new": 3}, "method": {"params": {}}}
    assert config_differences(stored, current) == {"method.params.x": {"before": 1, "after": None},
                                                   "train.new": {"before": None, "after": 3}}
    # a key the stored config predates, at its default, is no difference; at another value it is
    assert config_differences(stored, current, defaults={"train": {"new": 3}}) == {
        "method.params.x": {"before": 1, "after": None}}
    assert "train.new" in config_differences(stored, current, defaults={"train": {"new": 4}})


def test_resume_accepts_a_run_stored_before_a_key_existed_when_it_has_its_default(tiny_npz, tmp_path):
    """A run whose config.yaml predates backbone.source / revision and a method parameter added later resumes as
    before."""
    recipe = _recipe(tiny_npz, tmp_path, "older", epochs=1)
    _first_task_only(recipe)
    stored_path = tmp_path / "older" / "config.yaml"
    stored = yaml.safe_load(stored_path.read_text())
    del stored["backbone"]["source"], stored["backbone"]["revision"], stored["method"]["params"]["ca_epochs"]
    stored_path.write_text(yaml.safe_dump(stored))
    assert Trainer(config_from_dict(recipe)).run(resume=True)["config_changes"] == []
    stored["backbone"]["revision"] = "main"  # a stored value other than the default is a change
    stored_path.write_text(yaml.safe_dump(stored))
    with pytest.raises(ConfigError, match=r"backbone.revision: 'main' -> None"):
        Trainer(config_from_dict(recipe)).run(resume=True)
