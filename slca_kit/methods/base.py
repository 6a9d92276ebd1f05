"""The small interface every continual-learning method implements; the trainer calls only these hooks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError

if TYPE_CHECKING:  # imported for type hints only
    from accelerate import Accelerator

    from ..config import Config
    from ..data.scenario import Scenario
    from ..models.continual import ContinualModel


def require_positive(params: Any, *names: str) -> None:
    """For a ``Params.__post_init__``: refuse 0 where it is certain to break a run (a temperature divides, a batch
    size or sample count of 0 averages over nothing). Negative values of every numeric parameter are refused for
    all methods by ``validate_method_params``."""
    for name in names:
        value = getattr(params, name)
        if value is not None and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"method.params.{name}: must be > 0, got {value}")


@dataclass
class TaskContext:
    """What a method may use during one task. ``extract_features`` runs the current backbone with TEST transforms
    over this process's shard of the chosen split and classes; ``gather_features`` does the same over the whole
    split on every process and also returns each sample's index in the split (ordered by it); ``reduce_sum`` sums
    tensors over processes."""

    task: int
    scenario: "Scenario"
    config: "Config"
    accelerator: "Accelerator"
    extract_features: Callable[[list[int], str], tuple[torch.Tensor, torch.Tensor]]
    gather_features: Callable[[list[int], str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    # (classes, split, batch_size) -> batches of (images, labels) on the device: this process's shard, TEST transform
    iterate_images: Callable[[list[int], str, int], Any]
    # (classes, batch_size, epoch) -> one epoch of the training split's images of ``classes`` with the TRAIN transform,
    # shuffled by epoch, in batches of batch_size over all processes: this process's share of each batch (may be
    # empty) as (images, labels) on the device. For a method's own training phase (HiDe-Prompt's task-identity head).
    iterate_training_images: Callable[[list[int], int, int], Any]
    reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    timer: Callable[[str], Any]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def known_classes(self) -> int:
        """Classes of earlier tasks (the current task's labels start here)."""
        return self.scenario.task_offset(self.task)

    @property
    def seen_classes(self) -> int:
        return self.scenario.seen_classes(self.task)

    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            from accelerate.logging import get_logger

            get_logger("slca_kit").info(message, main_process_only=True)


class Method:
    """Base method: sequential fine-tuning with per-task heads and current-task cross-entropy.

    Subclasses set ``name`` and ``Params`` (a dataclass of hyper-parameters with paper defaults) and override
    only the hooks that make them different."""

    name: ClassVar[str]
    Params: ClassVar[type]
    # True when some trainable parameters get no gradient in some steps (DDP must then look for them).
    ddp_find_unused_parameters: ClassVar[bool] = False
    # True when the method can use a task id at test time: the trainer then also reports task-incremental
    # accuracy (each test sample classified among its own task's classes by ``predict_task``).
    needs_task_id: ClassVar[bool] = False

    @classmethod
    def backbone_sources(cls, params: Any) -> tuple[str, ...]:
        """The ``backbone.source`` values this method works with (with these ``params``); methods that reach into
        timm's ViT blocks say ("timm",)."""
        return ("timm", "transformers")

    def __init__(self, params: Any, config: "Config"):
        self.params = params
        self.config = config

    # -- which data a task trains on --------------------------------------------------------------
    def training_classes(self, ctx: TaskContext) -> list[int]:
        return ctx.scenario.task_classes(ctx.task)

    def train_epochs(self, ctx: TaskContext) -> int:
        return self.config.train.epochs

    def training_images_needed(self) -> tuple[int, str]:
        """The fewest training images per class this method works with, and the step that needs them (checked on
        the data before any work)."""
        return 1, self.name

    def extra_training_samples(self, ctx: TaskContext) -> list[int]:
        """Indices into the training split added to the task's data (a replay buffer's exemplars)."""
        return []

    # -- hooks ------------------------------------------------------------------------------------
    def grow(self, model: "ContinualModel", ctx: TaskContext) -> None:
        """Add task ``ctx.task``'s own modules (after its head was added). Also called when a checkpoint is
        restored, so that the model has the checkpoint's structure before its weights are loaded."""

    def before_task(self, model: "ContinualModel", ctx: TaskContext) -> None:
        """Called after the trainer added this task's head. Default: freeze earlier tasks' heads (reference)."""
        for index, head in enumerate(model.head.heads):
            head.requires_grad_(index == ctx.task)

    def param_groups(self, model: "ContinualModel", ctx: TaskContext) -> list[dict]:
        """Optimizer parameter groups, each with its own ``lr``: head at train.lr, backbone at
        train.lr * backbone_lr_scale, a peft adapter at train.lr * adapter.lr_scale, modules the method attached to
        the model (prompts) at train.lr; frozen parameters left out."""
        lr = self.config.train.lr
        head = [p for p in model.head.parameters() if p.requires_grad]
        trainable = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
        adapter = [p for n, p in trainable if n in model.adapter_parameter_names]
        backbone = [p for n, p in trainable if n not in model.adapter_parameter_names]
        scale = getattr(self.params, "backbone_lr_scale", 1.0)
        groups = [{"name": "head", "params": head, "lr": lr}]
        if backbone and scale > 0:
            groups.append({"name": "backbone", "params": backbone, "lr": lr * scale})
        if adapter:
            groups.append({"name": "adapter", "params": adapter, "lr": lr * self.config.adapter.lr_scale})
        # Modules a method attached to the model itself (prompt pools, keys, ...) train at train.lr.
        attached = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(("backbone.",
                                                                                                     "head."))]
        if attached:
            groups.append({"name": "method", "params": attached, "lr": lr})
        return groups

    def before_epoch(self, model: "ContinualModel", ctx: TaskContext, epoch: int) -> None:
        """Start of each training epoch (also the first epoch after a mid-task resume)."""

    def training_loss(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      ctx: TaskContext) -> torch.Tensor:
        """Cross-entropy on the current task's logits only (GengDavid/SLCA models/slca.py: ``logits[:, known:]``,
        targets - known)."""
        logits = model(images)
        return F.cross_entropy(logits[:, ctx.known_classes:], labels - ctx.known_classes)

    def after_optimizer_step(self, model: "ContinualModel", ctx: TaskContext) -> None:
        """After each optimizer update, before gradients are cleared (``p.grad`` still holds them)."""

    def after_training(self, model: "ContinualModel", ctx: TaskContext) -> None:
        """After the task's epochs, before evaluation (statistics, alignment, importance, ...)."""

    def predict(self, model: "ContinualModel", images: torch.Tensor, ctx: TaskContext) -> torch.Tensor:
        """Logits over all seen classes."""
        return model(images)

    def evaluation_batch(self) -> int | None:
        """None (default): ``predict`` classifies each image on its own, so accuracy does not depend on how the test
        set is batched. A method whose prediction for an image depends on the other images in its batch (batch-wise
        prompt selection) returns the official test batch size instead: the trainer then evaluates each task's test
        images separately, in consecutive batches of that size, as the official code does (google-research/l2p
        train_continual.py:458-473, JH-LEE-KR/dualprompt-pytorch engine.py:150), whatever ``train.eval_batch_size``
        and the number of processes."""
        return None

    def predict_task(self, model: "ContinualModel", images: torch.Tensor, task: int, ctx: TaskContext) -> torch.Tensor:
        """Logits over task ``task``'s classes only, knowing the task id (task-incremental evaluation)."""
        offset = ctx.scenario.task_offset(task)
        return self.predict(model, images, ctx)[:, offset:offset + ctx.scenario.task_sizes[task]]

    def end_task(self, model: "ContinualModel", ctx: TaskContext) -> None:
        """After evaluation, before the task's checkpoint."""

    def task_summary(self, model: "ContinualModel", ctx: TaskContext) -> dict[str, Any]:
        """Numbers about the method after the task (parameter growth, buffer size, ...) for results.json."""
        return {}

    # -- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (tensors, numbers, lists and dicts of them)."""
