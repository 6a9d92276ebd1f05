"""One training loop for every method, on ``accelerate``: devices, DDP, mixed precision, gradient accumulation,
per-group learning rates, per-epoch schedules, checkpoints, evaluation and results.

Per task: add the task's head -> method.before_task -> epochs of method.training_loss -> method.after_training
-> evaluate on all seen classes -> method.end_task -> checkpoint + results. The trainer knows no method by name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import resource
import signal
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import feature_cache
from .config import Config, TrainConfig
from .data import build_scenario, load_data
from .data.sources import check_images_per_class
from .data.task_data import EpochShuffleSampler
from .data.transforms import build_transforms
from .errors import CheckpointError, ConfigError, Preempted, RunFolderBusy
from .evaluation import Evaluator
from .finite import ensure_finite_loss, ensure_finite_tensors, flat_tensors
from .io import write_text_atomic
from .methods import TaskContext, build_method, method_class
from .metrics import AccuracyMatrix
from .models import build_model
from .models.adapters import adapter_state_dict
from .models.hf_backbone import fill_image_settings
from .monitor import EpochProgress, epoch_metrics, learning_rates, task_metrics
from .parallelism import refuse_sharded_launch, refuse_sharded_state
from .preemption import StopRequest
from .provenance import collect as collect_provenance
from .report import write_run_outputs
from .task_images import TaskImages
from .run_folder import RunLock, check_resume_config, read_config_changes, record_config_change

logger = get_logger("slca_kit")
ADAPTER_FILE = "adapter_model.safetensors"
RUN_STATE_FILE = "custom_checkpoint_0.pkl"  # accelerate's name for the first registered object (RunState)


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}}.get(cfg.optimizer_impl, {})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **impl)
    optimizer_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return optimizer_cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **impl)


def optimizer_to_step(optimizer: AcceleratedOptimizer, accelerator: Accelerator):
    """The optimizer the loop steps, only at steps where gradients sync. accelerate's wrapper does work of its own
    only with a gradient scaler (fp16), on XLA and for LOMO optimizers (``build_optimizer`` makes none); otherwise its
    ``step`` passes through when gradients sync, at ~0.1 ms a step (it looks up the ``lomo_optim`` package with
    importlib twice: accelerate optimizer.py), so then the wrapped torch optimizer is stepped directly
    (benchmarks/train_step.py)."""
    passes_through = (type(optimizer) is AcceleratedOptimizer and optimizer.scaler is None
                      and accelerator.distributed_type != DistributedType.XLA)
    return optimizer.optimizer if passes_through else optimizer


def compile_backbone(backbone: torch.nn.Module, backend: str) -> None:
    """``torch.compile`` the backbone in place with ``backend``, refusing an unknown backend before any work."""
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        usual = sorted(set(torch._dynamo.list_backends()) | {"eager", "aot_eager"})
        raise ConfigError(f"train.compile_backend: {backend!r} is not a torch.compile backend; e.g. "
                          f"{', '.join(usual)}")
    backbone.compile(backend=backend)


def coda_cosine_factor(epoch: int, epochs: int) -> float:
    """CODA-Prompt's ``CosineSchedule``: lr x cos(99 pi e / (200 (K - 1))) at epoch e of K, a quarter cosine that
    ends at cos(0.495 pi) ~ 0.016 (GT-RIPL/CODA-Prompt utils/schedulers.py:47-57; InfLoRA uses the same class,
    liangyanshuo/InfLoRA methods/inflora.py:169). With one epoch the official formula divides by zero; the lr is
    then constant."""
    if epochs <= 1:
        return 1.0
    return math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epochs: int):
    """Stepped once per epoch."""
    if cfg.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=cfg.eta_min)
    if cfg.scheduler == "coda_cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: coda_cosine_factor(epoch, epochs))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunState:
    """Everything besides model/optimizer weights that a checkpoint must restore (registered with accelerate)."""

    def __init__(self, method):
        self.method = method
        self.matrix = AccuracyMatrix()
        # Task-incremental accuracies, for methods that can use a task id at test (``Method.needs_task_id``).
        self.task_matrix = AccuracyMatrix()
        self.task_records: list[dict] = []

    def state_dict(self) -> dict:
        return {"matrix": self.matrix.state_dict(), "task_matrix": self.task_matrix.state_dict(),
                "task_records": self.task_records, "method": self.method.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.matrix = AccuracyMatrix.from_state_dict(state["matrix"])
        self.task_matrix = AccuracyMatrix.from_state_dict(state.get("task_matrix", {"totals": [], "correct": []}))
        self.task_records = list(state["task_records"])
        self.method.load_state_dict(state["method"])


class Trainer:
    def __init__(self, config: Config, run_dir: str | Path | None = None):
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else Path(config.output_dir) / config.name
        train = config.train
        refuse_sharded_launch()
        self.accelerator = Accelerator(
            # cpu=True also lets torchrun start gloo DDP on CPU-only machines (accelerate needs it for MULTI_CPU).
            cpu=train.cpu or not torch.cuda.is_available(),
            mixed_precision=train.mixed_precision,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            # Methods whose loss skips some trainable parameters in some steps say so (extra graph traversal).
            kwargs_handlers=[DistributedDataParallelKwargs(
                find_unused_parameters=method_class(config.method.name).ddp_find_unused_parameters)],
            log_with=train.log_with or None,
            project_dir=str(self.run_dir),
            step_scheduler_with_optimizer=False,  # schedules are per epoch
        )
        refuse_sharded_state(self.accelerator.distributed_type)
        per_step = self.accelerator.num_processes * train.gradient_accumulation_steps
        if train.batch_size % per_step:
            raise ConfigError(f"train.batch_size: {train.batch_size} must divide by processes x accumulation "
                              f"steps = {per_step} (it is the global batch per optimizer step)")
        self.micro_batch = train.batch_size // per_step
        if train.deterministic and self.accelerator.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.data = load_data(config.data)
        if self.data.skipped:
            logger.warning(f"data.bad_images=skip: left out {len(self.data.skipped)} unreadable images, first "
                           f"{[entry['file'] for entry in self.data.skipped[:3]]}", main_process_only=True)
        self.scenario = build_scenario(config.scenario, self.data.num_classes)
        self.label_map = self.scenario.label_map()
        if config.backbone.source == "transformers":
            fill_image_settings(config)  # the checkpoint's image processor, where the recipe set nothing
        self.train_transform, self.test_transform = build_transforms(config.data)
        self.method = build_method(config)
        check_images_per_class(self.data, self.scenario, *self.method.training_images_needed())
        set_seed(train.seed)
        self.model = build_model(config.backbone, config.adapter).to(self.accelerator.device)
        if train.compile_backend:
            compile_backbone(self.model.backbone, train.compile_backend)
        self.images = TaskImages(config, self.data, self.label_map, (self.train_transform, self.test_transform),
                                 self.accelerator, lambda: self.model, self.run_dir)
        # what methods and tests read through the trainer: this process's shard, or all samples on every process
        self.iterate_images = self.images.iterate_images
        self.extract_features, self.gather_features = self.images.extract_features, self.images.gather_features
        self.evaluator = Evaluator(self.data.test, self.label_map, self.test_transform, self.scenario, self.method,
                                   self.accelerator, config, shard=self.images.shard, reduce_sum=self._reduce_sum)
        self.provenance = collect_provenance(config, self.data, self.accelerator)
        self.state = RunState(self.method)
        self.accelerator.register_for_checkpointing(self.state)
        self._timings: dict[str, float] = {}
        self._task = 0
        self._resume_from: Path | None = None  # the checkpoint a resumed run continues from
        self._stop = StopRequest()

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def _seed(self, task: int, epoch: int = 0) -> None:
        """Seed from (seed, task, epoch) so a run resumed at any task or epoch boundary continues identically."""
        set_seed((self.config.train.seed * 1_000_003 + task * 1_009 + epoch) % 2**31)

    @contextlib.contextmanager
    def _timer(self, section: str):
        logger.info(f"task {self._task + 1}: {section}", main_process_only=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._timings[section] = self._timings.get(section, 0.0) + time.perf_counter() - start

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.contiguous(), reduction="sum")

    def context(self, task: int) -> TaskContext:
        images = self.images
        return TaskContext(task=task, scenario=self.scenario, config=self.config, accelerator=self.accelerator,
                           extract_features=images.extract_features, gather_features=images.gather_features,
                           iterate_images=images.iterate_images,
                           iterate_training_images=functools.partial(images.iterate_training_images, task=task),
                           reduce_sum=self._reduce_sum, timer=self._timer)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, resume: bool = False, allow_config_change: bool = False) -> dict:
        """Train every task (from the latest checkpoint with ``resume``). The run folder is locked meanwhile;
        SIGTERM / SIGINT stop it at the next safe point with a checkpoint (``Preempted``)."""
        lock = RunLock(self.run_dir)
        self._acquire(lock)
        try:
            with self._stop.installed():
                return self._run(resume, allow_config_change, lock)
        finally:
            lock.release()

    def _acquire(self, lock: RunLock) -> None:
        """The main process locks the run folder; a refusal is raised on every process, so none is left waiting
        in a collective."""
        refusal = None
        if self.accelerator.is_main_process:
            try:
                lock.acquire()
            except RunFolderBusy as err:
                refusal = str(err)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise RunFolderBusy(refusal)

    def _run(self, resume: bool, allow_config_change: bool, lock: RunLock) -> dict:
        accelerator = self.accelerator
        if lock.previous_holder:
            logger.warning(f"{self.run_dir}: took over a stale lock of a process that no longer runs "
                           f"({lock.previous_holder})", main_process_only=True)
        start_task, start_epoch, skip_steps = 0, 0, 0
        if resume:
            defaults = Config().to_dict()
            defaults["method"]["params"] = dataclasses.asdict(type(self.method.params)())
            changed = check_resume_config(self.run_dir, self.config.to_dict(), allow_config_change, defaults)
            start_task, start_epoch, skip_steps = self._prepare_resume()
            if changed:
                logger.warning(f"--allow-config-change: resuming with changed {', '.join(changed)}",
                               main_process_only=True)
                if accelerator.is_main_process:
                    record_config_change(self.run_dir, changed, self._resume_from.name)
        elif ckpt.latest_checkpoint(self.checkpoint_root) is not None:
            raise CheckpointError(f"{self.run_dir} already holds checkpoints: pass --resume to continue that run, "
                                  "or choose another name / output_dir")
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        if self.config.train.log_with:
            accelerator.init_trackers(self.config.name, config=_flat(self.config.to_dict()))
        logger.info(f"{self.config.method.name}: {self.scenario.num_tasks} tasks {list(self.scenario.task_sizes)} on "
                    f"{accelerator.num_processes} process(es), device {accelerator.device}", main_process_only=True)
        for task in range(start_task, self.scenario.num_tasks):
            first = task == start_task
            self._run_task(task, start_epoch if first else 0, resuming=resume and first,
                           skip_steps=skip_steps if first else 0)
            if task + 1 < self.scenario.num_tasks:
                self._stop_if_asked(f"after task {task}", ckpt.checkpoint_name(task, None))
        results = self.results(complete=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_run_outputs(self.run_dir, results)
        # Trackers end with the run; the process group does not (accelerator.end_training would destroy it): one
        # launch may train several runs (--seeds, the default job, reproduce). The CLI destroys it on exit.
        for tracker in accelerator.trackers:
            tracker.finish()
        return results

    def _add_heads_until(self, task: int) -> None:
        while len(self.model.head.heads) <= task:
            index = len(self.model.head.heads)
            self.model.head.add_task(self.scenario.task_sizes[index]).to(self.accelerator.device)
            self.method.grow(self.model, self.context(index))

    def _run_task(self, task: int, start_epoch: int, resuming: bool, skip_steps: int = 0) -> None:
        accelerator = self.accelerator
        self._timings = {}
        self._task = task
        mid_task = resuming and (start_epoch > 0 or skip_steps > 0)
        if not mid_task:
            self._seed(task)
            self._add_heads_until(task)
        ctx = self.context(task)
        self.method.before_task(self.model, ctx)
        epochs = self.method.train_epochs(ctx)
        bar = tqdm(total=epochs, initial=start_epoch, desc=f"task {task + 1}/{self.scenario.num_tasks}",
                   disable=not accelerator.is_local_main_process, leave=False)
        # With no epochs the model is still prepared: save_state checkpoints what the accelerator holds.
        prepared = self._prepare_training(ctx, epochs) if epochs > 0 else accelerator.prepare_model(self.model)
        if mid_task:
            accelerator.load_state(str(self._resume_from))
        with self._timer("train"):
            for epoch in range(start_epoch, epochs):
                self._train_epoch(prepared, ctx, epoch, skip_steps if epoch == start_epoch else 0)
                bar.update(1)
                if self.config.train.checkpoint_every_epoch and epoch + 1 < epochs:
                    self._save_checkpoint(task, epoch)
        bar.close()
        self.method.after_training(self.model, ctx)
        stage = f"{self.config.method.name} after training"
        ensure_finite_tensors(self.model.named_parameters(), "parameter", stage, task)
        ensure_finite_tensors(flat_tensors(self.method.state_dict()), "method state", stage, task)
        with self._timer("evaluation"):
            correct, totals = self.evaluate(ctx)
            if self.method.needs_task_id:
                self.state.task_matrix.add_row(*self.evaluate_task_incremental(ctx))
        self.state.matrix.add_row(correct, totals)
        self.method.end_task(self.model, ctx)
        record = {"task": task, "classes": ctx.seen_classes, "seen_accuracy": self.state.matrix.seen_accuracy(task),
                  "seconds": {k: round(v, 3) for k, v in self._timings.items()},
                  "peak_memory_mib": round(peak_memory_mib(accelerator.device), 1)}
        if self.method.needs_task_id:
            record["task_incremental_accuracy"] = self.state.task_matrix.seen_accuracy(task)
        summary = self.method.task_summary(self.model, ctx)
        if summary:
            record["method"] = summary
        self.state.task_records.append(record)
        logger.info(f"task {task + 1}/{self.scenario.num_tasks}: accuracy on {ctx.seen_classes} seen classes "
                    f"{record['seen_accuracy']:.2f}%  ({record['seconds']})", main_process_only=True)
        if self.config.train.log_with:
            accelerator.log(task_metrics(record, self.state.matrix), step=task)
        self._save_checkpoint(task, None)
        if accelerator.is_main_process:
            write_run_outputs(self.run_dir, self.results(complete=False))
        self.model = accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        accelerator.free_memory()

    def _prepare_training(self, ctx: TaskContext, epochs: int) -> dict:
        accelerator = self.accelerator
        dataset = self.images.training_dataset(self.method.training_classes(ctx),
                                               augment_seed=self.config.train.seed * 1_000 + ctx.task,
                                               extra_indices=self.method.extra_training_samples(ctx))
        if self.config.train.feature_cache and feature_cache.only_head_trains(self.model):
            dataset = self.images.cached_features(ctx.task, dataset, self._timer)
        sampler = EpochShuffleSampler(len(dataset), self.config.train.seed * 1_000 + ctx.task)
        loader = self.images.loader(dataset, self.micro_batch, sampler=sampler)
        groups = [g for g in self.method.param_groups(self.model, ctx) if g["params"]]
        optimizer = build_optimizer(groups, self.config.train)
        scheduler = build_scheduler(optimizer, self.config.train, epochs)
        model, optimizer, loader, scheduler = accelerator.prepare(self.model, optimizer, loader, scheduler)
        return {"model": model, "optimizer": optimizer, "loader": self.images.training_loader(loader),
                "scheduler": scheduler, "dataset": dataset, "sampler": sampler}

    def _train_epoch(self, prepared: dict, ctx: TaskContext, epoch: int, skip_steps: int = 0) -> None:
        """One epoch; with ``skip_steps`` > 0 the rest of an epoch a preempted run stopped in (its RNG state was
        restored with the checkpoint, its first ``skip_steps`` micro-batches are left out)."""
        accelerator = self.accelerator
        model, optimizer = prepared["model"], optimizer_to_step(prepared["optimizer"], accelerator)
        # Cleared through the torch optimizer: accelerate's wrapper skips zero_grad where gradients do not sync,
        # which is where an accumulation window starts.
        clear_gradients = functools.partial(prepared["optimizer"].optimizer.zero_grad, set_to_none=True)
        if not skip_steps:
            self._seed(ctx.task, epoch + 1)
        # accelerate's loader re-sets its sampler's (and sometimes the dataset's) epoch to its own iteration count
        # when iterated, which restarts at 0 after a resume: give it the real epoch.
        prepared["loader"].set_epoch(epoch)
        prepared["dataset"].set_epoch(epoch)
        # Micro-batches are shared out over processes in turn: skipping k per process skips k x world batches.
        prepared["sampler"].skip_next(skip_steps * self.micro_batch * accelerator.num_processes)
        self.method.before_epoch(self.model, ctx, epoch)
        model.train()
        batches = iter(prepared["loader"])
        if skip_steps:  # the loader's first draw from the global RNG was made before the checkpoint's RNG state
            with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
                first = next(batches, None)
            batches = itertools.chain([first] if first is not None else [], batches)
        rates = learning_rates(optimizer)
        progress = EpochProgress(len(prepared["loader"]) - skip_steps, f"  epoch {epoch + 1}",
                                 accelerator.is_local_main_process, accelerator.num_processes, rates)
        window_starts = True  # the first micro-batch of an accumulation window (of every step without accumulation)
        for step, (images, labels) in enumerate(batches, start=skip_steps):
            with accelerator.accumulate(model):
                loss = self.method.training_loss(model, images, labels, ctx)
                value = ensure_finite_loss(loss, "training", ctx.task, epoch, step, hint=" (lower train.lr?)")
                progress.update(value, len(labels))
                # The reference's order, zero_grad / backward / step (GengDavid/SLCA models/slca.py:130-132): the
                # new gradients reuse the memory of the ones just freed; clearing after the step instead made the
                # CPU step 3 % slower here (docs/performance.md).
                if window_starts:
                    clear_gradients()
                accelerator.backward(loss)
                window_starts = accelerator.sync_gradients
                if accelerator.sync_gradients:  # an update every gradient_accumulation_steps micro-batches
                    if self.config.train.grad_clip is not None:
                        accelerator.clip_grad_norm_(model.parameters(), self.config.train.grad_clip)
                    optimizer.step()
                    self.method.after_optimizer_step(self.model, ctx)
            if accelerator.sync_gradients:
                self._stop_if_asked(f"task {ctx.task}, epoch {epoch}, step {step}", None, (ctx.task, epoch, step))
        clear_gradients()  # none held past the epoch (evaluation, the methods' after-training stages)
        progress.close()
        trainable = ((name, p) for name, p in self.model.named_parameters() if p.requires_grad)
        ensure_finite_tensors(trainable, "parameter", "training", ctx.task, epoch, hint=" (lower train.lr?)")
        if self.config.train.log_with and progress.steps:
            accelerator.log(epoch_metrics(progress.mean_loss, rates), step=self._epochs_before(ctx.task) + epoch)
        prepared["scheduler"].step()

    def _epochs_before(self, task: int) -> int:
        """Training epochs of the tasks before ``task``: the x axis of per-epoch tracker values, the same after a
        resume."""
        return sum(self.method.train_epochs(self.context(t)) for t in range(task))

    def evaluate(self, ctx: TaskContext) -> tuple[list[int], list[int]]:
        """Class-incremental correct counts and test samples per task (see ``Evaluator``)."""
        return self.evaluator.class_incremental(self.model, ctx)

    def evaluate_task_incremental(self, ctx: TaskContext) -> tuple[list[int], list[int]]:
        """Task-incremental correct counts and test samples per task (see ``Evaluator``)."""
        return self.evaluator.task_incremental(self.model, ctx)

    # -- checkpoints --------------------------------------------------------------------------------
    def _stop_if_asked(self, where: str, saved: str | None, position: tuple[int, int, int] | None = None) -> None:
        """At a safe point: if any process got SIGTERM / SIGINT, write the checkpoint of ``position`` (task, epoch,
        step) unless ``saved`` names one just written, and raise ``Preempted`` on every process."""
        number = self._stop.agreed(self.accelerator)
        if number is None:
            return
        if saved is None:
            self._save_checkpoint(*position)
            saved = ckpt.checkpoint_name(*position)
            if self.accelerator.is_main_process:
                write_run_outputs(self.run_dir, self.results(complete=False))
        raise Preempted(f"stopped by {signal.Signals(number).name} {where}; checkpoint {self.checkpoint_root / saved} "
                        "is complete", number)

    def _save_checkpoint(self, task: int, epoch: int | None, step: int | None = None) -> None:
        name = ckpt.checkpoint_name(task, epoch, step)
        logger.info(f"task {task + 1}: saving checkpoint {name}", main_process_only=True)
        extra = {}
        if self.model.adapter_parameter_names:  # the adapter alone too, in peft's format, for use outside slca_kit
            extra[ADAPTER_FILE] = lambda path: save_file(adapter_state_dict(self.model.backbone), str(path))
        progress = {"task": task, "epoch": epoch, "step": step, "head_sizes": self.model.head.task_sizes}
        ckpt.save_state(self.accelerator, self.checkpoint_root, name, progress, self.config.train.keep_checkpoints,
                        extra)

    def _prepare_resume(self) -> tuple[int, int, int]:
        """Rebuild heads up to the checkpoint, load it, and return the (task, epoch, micro-batches of that epoch
        already done) to continue from."""
        latest = ckpt.latest_valid_checkpoint(self.checkpoint_root, warn=logger.warning)
        if latest is None:
            raise CheckpointError(f"--resume: no complete, undamaged checkpoint under {self.checkpoint_root}")
        progress = ckpt.read_progress(latest)
        task, epoch = progress["task"], progress["epoch"]
        if progress["head_sizes"] != list(self.scenario.task_sizes[:task + 1]):
            raise CheckpointError(f"{latest}: head sizes {progress['head_sizes']} do not match this recipe's "
                                  f"tasks {list(self.scenario.task_sizes)}")
        self._add_heads_until(task)
        self._resume_from = latest
        logger.info(f"resuming from {latest}", main_process_only=True)
        if epoch is None:
            self.accelerator.prepare_model(self.model)
            self.accelerator.load_state(str(latest))
            self.model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
            self.accelerator.free_memory()
            return task + 1, 0, 0
        # Mid-task: model, optimizer and scheduler are rebuilt for the task, then loaded in _run_task. The method's
        # state is needed earlier, when the task's data is built (a replay buffer adds its exemplars).
        self.state.load_state_dict(torch.load(latest / RUN_STATE_FILE, weights_only=False))
        step = progress.get("step")
        return (task, epoch + 1, 0) if step is None else (task, epoch, step + 1)

    def load_for_eval(self, checkpoint: Path) -> int:
        """Load a checkpoint for evaluation only; returns the last finished task."""
        progress = ckpt.read_progress(checkpoint)
        if progress["epoch"] is not None:
            raise CheckpointError(f"{checkpoint}: a mid-task checkpoint; evaluate a task-end checkpoint instead")
        self._add_heads_until(progress["task"])
        self.accelerator.prepare_model(self.model)
        self.accelerator.load_state(str(checkpoint))
        self.model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        return progress["task"]

    # -- results ----------------------------------------------------------------------------------
    def results(self, complete: bool) -> dict:
        matrix = self.state.matrix
        return {
            "name": self.config.name,
            "method": self.config.method.name,
            "complete": complete,
            "num_processes": self.accelerator.num_processes,
            "task_sizes": list(self.scenario.task_sizes),
            "class_order": list(self.scenario.class_order),
            "class_names": list(self.data.class_names),  # by the dataset's label id
            "skipped_images": {"count": len(self.data.skipped), "first": self.data.skipped[:20]},
            "data_split": self.data.split,  # split name, sizes, test-set fingerprint
            "setting": "class-incremental",  # the top-level accuracies: no task id at test
            "evaluation": self.evaluator.protocol(),
            **matrix.summary(),
            "task_incremental": self.state.task_matrix.summary() if self.state.task_matrix.num_rows else None,
            "config_changes": read_config_changes(self.run_dir),  # accepted with --resume --allow-config-change
            "provenance": self.provenance,
            "tasks": self.state.task_records,
            "config": self.config.to_dict(),
        }


def _flat(tree: dict, prefix: str = "") -> dict:
    """Flatten nested config for trackers, which accept scalar hyper-parameters only."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def configure_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file is noise
