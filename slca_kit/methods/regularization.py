"""Selective synaptic plasticity on the pretrained ViT: EWC (and online EWC), MAS, SI (lifelong_methods.md, 1).

The new task's loss is the current-task cross-entropy plus ``strength * sum_i b_i (theta_i - theta*_i)^2`` over the
backbone parameters that train, b_i each parameter's importance for earlier tasks and theta* where they were.
Importance is computed after each task (``after_training``), summed over DDP processes, and kept in checkpoints.

Several quadratic penalties sum to one quadratic: sum_t F_t (theta - theta_t)^2 = A (theta - m)^2 + const with
A = sum_t F_t and m = sum_t F_t theta_t / A. So EWC with one penalty per task keeps just (A, m) -- the same
gradient as T separate penalties at the memory of one.
"""
from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch.func import functional_call, grad, vmap

from ..finite import ensure_finite_tensors
from .base import Method, TaskContext


def tracked_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The backbone parameters that train in this task, by their name in the model."""
    return {name: p for name, p in model.named_parameters() if name.startswith("backbone.") and p.requires_grad}


def per_sample_gradients(model, names: list[str], images: torch.Tensor, labels: torch.Tensor,
                         sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """d sample_loss(logits_i, label_i) / d theta for each sample i (torch.func.vmap over the batch), for the named
    parameters; other parameters and buffers are read from ``model``. Returns {name: [batch, *shape]}."""
    params = {name: p.detach() for name, p in model.named_parameters() if name in names}
    # The other parameters enter detached too, so the result carries no autograd graph.
    fixed = {name: p.detach() for name, p in model.named_parameters() if name not in names}

    def loss(parameters, image, label):
        logits = functional_call(model, {**fixed, **parameters}, (image[None],))
        return sample_loss(logits[0], label)

    with warnings.catch_warnings():  # SDPA has no batching rule: vmap falls back to a loop and says so
        warnings.simplefilter("ignore", UserWarning)
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, images, labels)


class ImportanceRegularizer(Method, abc.ABC):
    """Shared machinery: the quadratic penalty, its state, and the after-task consolidation."""

    # Coefficient in front of strength * sum b (theta - theta*)^2: EWC writes lambda / 2 (Kirkpatrick et al. 2017).
    penalty_factor: ClassVar[float] = 1.0

    def __init__(self, params, config):
        super().__init__(params, config)
        self.importance: dict[str, torch.Tensor] = {}  # b_i, float32, CPU
        self.anchor: dict[str, torch.Tensor] = {}  # theta*_i
        self._device_state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    @abc.abstractmethod
    def strength(self) -> float:
        """The penalty's weight (each method names its own hyper-parameter)."""

    def before_epoch(self, model, ctx: TaskContext, epoch: int) -> None:
        # Here, not in before_task: a mid-task resume restores importance and anchor after before_task.
        self._device_state = {name: (self.importance[name].to(ctx.device), self.anchor[name].to(ctx.device))
                              for name in self.importance}

    def penalty(self, model) -> torch.Tensor:
        """sum_i b_i (theta_i - theta*_i)^2 over the parameters with a stored importance."""
        named = dict(model.named_parameters())
        terms = [(b * (named[name] - anchor) ** 2).sum() for name, (b, anchor) in self._device_state.items()]
        return torch.stack(terms).sum() if terms else torch.zeros((), device=next(model.parameters()).device)

    def training_loss(self, model, images, labels, ctx: TaskContext) -> torch.Tensor:
        loss = super().training_loss(model, images, labels, ctx)
        if not self._device_state:
            return loss
        return loss + self.penalty_factor * self.strength * self.penalty(ctx.accelerator.unwrap_model(model))

    def after_training(self, model, ctx: TaskContext) -> None:
        with ctx.timer("importance"):
            task_importance = self.task_importance(model, ctx)
        ensure_finite_tensors(task_importance.items(), "importance of", f"{self.name} importance", ctx.task)
        # A copy: on CPU, .float().cpu() of a float32 parameter would be the live parameter itself.
        current = {name: p.detach().float().cpu().clone() for name, p in tracked_parameters(model).items()}
        self.consolidate({name: b.float().cpu() for name, b in task_importance.items()}, current)
        self._device_state = {}

    @abc.abstractmethod
    def task_importance(self, model, ctx: TaskContext) -> dict[str, torch.Tensor]:
        """Importance of each tracked parameter for the task just trained."""

    def consolidate(self, task_importance: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> None:
        """Default (MAS, SI, online EWC): importances add up (times ``decay``), the anchor moves to the current
        parameters."""
        decay = getattr(self.params, "decay", 1.0)
        for name, b in task_importance.items():
            self.importance[name] = decay * self.importance[name] + b if name in self.importance else b
            self.anchor[name] = current[name]

    def _mean_over_task_samples(self, model, ctx: TaskContext, sample_objective,
                                sample_value) -> dict[str, torch.Tensor]:
        """mean over the task's training images (TEST transform, all processes) of sample_value(per-sample gradient
        of sample_objective(current-task logits, label)), per tracked parameter; ``importance_samples`` caps the
        images per process."""
        names = list(tracked_parameters(model))
        known, seen = ctx.known_classes, ctx.seen_classes
        sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in tracked_parameters(model).items()}
        count = torch.zeros((), device=ctx.device)
        limit = self.params.importance_samples
        was_training = model.training
        model.eval()
        for images, labels in ctx.iterate_images(ctx.scenario.task_classes(ctx.task), "train",
                                                 self.params.importance_batch_size):
            if limit is not None and count.item() >= limit:
                break
            if limit is not None:
                keep = int(limit - count.item())
                images, labels = images[:keep], labels[:keep]
            grads = per_sample_gradients(model, names, images, labels - known,
                                         lambda logits, label: sample_objective(logits[known:seen], label))
            for name in names:
                sums[name] += sample_value(grads[name].float()).sum(0)
            count += labels.numel()
        model.train(was_training)
        count = ctx.reduce_sum(count)
        return {name: ctx.reduce_sum(total) / count.clamp_min(1) for name, total in sums.items()}

    def state_dict(self) -> dict:
        return {"importance": self.importance, "anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        self.importance = dict(state["importance"])
        self.anchor = dict(state["anchor"])

    def task_summary(self, model, ctx: TaskContext) -> dict:
        values = torch.cat([b.flatten() for b in self.importance.values()]) if self.importance else torch.zeros(1)
        return {"regularized_parameters": int(values.numel()) if self.importance else 0,
                "importance_mean": values.mean().item(), "importance_max": values.max().item()}


class EWC(ImportanceRegularizer):
    """Elastic weight consolidation (Kirkpatrick et al. 2017): b = diagonal empirical Fisher, the mean over the
    task's images of the squared per-sample gradient of the current-task log-likelihood at the true label.

    ``online: false``: one penalty per earlier task (kept as one merged quadratic, see the module docstring).
    ``online: true``: online EWC (Schwarz et al. 2018): F <- gamma F + F_t and a single anchor at the last task."""

    name = "ewc"
    penalty_factor = 0.5

    @dataclass
    class Params:
        backbone_lr_scale: float = 1.0  # EWC trains all weights with one lr (Kirkpatrick et al. 2017)
        ewc_lambda: float = 1000.0  # lamda, G-U-N/PyCIL models/ewc.py:31 (class-incremental EWC)
        # Each task's Fisher is clamped at this value (fishermax, G-U-N/PyCIL models/ewc.py:32), so lr * lambda * F
        # stays small and SGD on the penalty stays stable; null: no clamp.
        fisher_max: float | None = 1e-4
        online: bool = False
        gamma: float = 1.0  # online EWC decay; 1.0 as in van de Ven et al. 2019 (three scenarios)
        importance_batch_size: int = 16  # images per vmap call (memory: batch x parameters)
        importance_samples: int | None = None  # images per process for the Fisher; None: the whole task

    @property
    def strength(self) -> float:
        return self.params.ewc_lambda

    def task_importance(self, model, ctx):
        def log_likelihood_loss(task_logits, label):
            return torch.nn.functional.cross_entropy(task_logits[None], label[None])

        fisher = self._mean_over_task_samples(model, ctx, log_likelihood_loss, torch.square)
        if self.params.fisher_max is None:
            return fisher
        return {name: f.clamp_max(self.params.fisher_max) for name, f in fisher.items()}

    def consolidate(self, task_importance, current):
        if self.params.online:
            for name, fisher in task_importance.items():
                old = self.importance.get(name)
                self.importance[name] = fisher if old is None else self.params.gamma * old + fisher
                self.anchor[name] = current[name]
            return
        for name, fisher in task_importance.items():
            if name not in self.importance:
                self.importance[name], self.anchor[name] = fisher, current[name]
                continue
            total = self.importance[name] + fisher
            weighted = self.importance[name] * self.anchor[name] + fisher * current[name]
            self.anchor[name] = torch.where(total > 0, weighted / total.clamp_min(1e-30), current[name])
            self.importance[name] = total


class MAS(ImportanceRegularizer):
    """Memory aware synapses (Aljundi et al. 2018): b = mean over the task's images of |d ||f(x)||_2^2 / d theta|,
    f the current task's logits; importances add up over tasks, the anchor is the last task's parameters."""

    name = "mas"

    @dataclass
    class Params:
        backbone_lr_scale: float = 1.0
        mas_lambda: float = 1.0  # Aljundi et al. 2018 (object recognition experiments)
        decay: float = 1.0  # importance <- decay * importance + task importance (1.0: the paper's accumulation)
        importance_batch_size: int = 16
        importance_samples: int | None = None

    @property
    def strength(self) -> float:
        return self.params.mas_lambda

    def task_importance(self, model, ctx):
        def squared_output_norm(task_logits, label):
            return (task_logits ** 2).sum()

        return self._mean_over_task_samples(model, ctx, squared_output_norm, torch.abs)


class SI(ImportanceRegularizer):
    """Synaptic intelligence (Zenke et al. 2017): during training, omega_i accumulates -g_i * (change of theta_i)
    at every optimizer step; after the task b_i += max(omega_i, 0) / ((theta_i(end) - theta_i(start))^2 + xi).

    g is the gradient the optimizer applied (the full loss, penalty included), read after each update; with DDP
    it is already averaged over processes, so omega is identical on every process and needs no reduction.
    Deliberate difference: a negative path integral is clamped to 0 (it would reward moving the parameter)."""

    name = "si"

    @dataclass
    class Params:
        backbone_lr_scale: float = 1.0
        si_c: float = 0.1  # c, Zenke et al. 2017 (permuted MNIST)
        xi: float = 1e-3  # damping, Zenke et al. 2017
        decay: float = 1.0

    def __init__(self, params, config):
        super().__init__(params, config)
        self.path_integral: dict[str, torch.Tensor] = {}
        self.task_start: dict[str, torch.Tensor] = {}
        self._previous: dict[str, torch.Tensor] = {}

    @property
    def strength(self) -> float:
        return self.params.si_c

    def before_task(self, model, ctx):
        # A mid-task resume loads the checkpoint's values over these right after this hook.
        super().before_task(model, ctx)
        self.task_start = {name: p.detach().float().clone() for name, p in tracked_parameters(model).items()}
        self.path_integral = {name: torch.zeros_like(v) for name, v in self.task_start.items()}

    def before_epoch(self, model, ctx, epoch):
        super().before_epoch(model, ctx, epoch)
        # Where the parameters are before the next update; state restored from a checkpoint moves to the device.
        self.task_start = {name: v.to(ctx.device) for name, v in self.task_start.items()}
        self.path_integral = {name: v.to(ctx.device) for name, v in self.path_integral.items()}
        self._previous = {name: p.detach().clone() for name, p in tracked_parameters(model).items()}

    def after_optimizer_step(self, model, ctx):
        for name, p in tracked_parameters(model).items():
            if p.grad is not None:
                self.path_integral[name] -= (p.grad.detach() * (p.detach() - self._previous[name])).float()
            self._previous[name] = p.detach().clone()

    def task_importance(self, model, ctx):
        importance = {}
        for name, p in tracked_parameters(model).items():
            change = p.detach().float() - self.task_start[name].to(p.device)
            omega = self.path_integral[name].to(p.device).clamp_min(0)
            importance[name] = omega / (change ** 2 + self.params.xi)
        self.task_start, self.path_integral = {}, {}
        return importance

    def state_dict(self):
        return {**super().state_dict(), "path_integral": {k: v.cpu() for k, v in self.path_integral.items()},
                "task_start": {k: v.cpu() for k, v in self.task_start.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.path_integral = dict(state.get("path_integral", {}))
        self.task_start = dict(state.get("task_start", {}))
