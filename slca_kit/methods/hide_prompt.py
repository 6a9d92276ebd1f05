"""HiDe-Prompt: hierarchical decomposition of prompt-based continual learning (Wang et al., NeurIPS 2023), as
thu-ml/HiDe-Prompt does it (training_scripts/train_cifar100_vit.sh: a ``--train_inference_task_only`` run, then the
prompted run that loads its per-task checkpoints).

- Within-task prediction: one prefix E-prompt per task in blocks 0-4 of the frozen ViT, trained with the task's
  linear head; from the second task the prompt in use is ``(1 - m) P_t + m mean(P_<t)`` and P_t itself is moved the
  same way after training (peft/prompt/hide_prompt.py:105-112, engines/hide_promtp_wtp_and_tap_engine.py:315-324). The
  loss adds a contrastive term between the batch's features and the stored class centroids (:528-546).
- Task-identity inference: an MLP classifier over all classes on the frozen ViT's feature (the "original model",
  engines/hide_tii_engine.py) trained on the task's augmented images; its predicted class names the prompt at test
  (hide_promtp_wtp_and_tap_engine.py:117-131).
- Task-adaptive prediction: after each task, per-class statistics of both feature spaces are stored and, from the
  second task, both classifiers are re-trained on draws from them (:418-525, hide_tii_engine.py:280-387).

The task-identity classifier trains here inside the same run, after each task's prompt epochs, on the same task's
images with its own optimizer and epochs; its gradients are summed over processes by hand (the prompted model is the
one DDP wraps). Class statistics are k-means centroids with diagonal variances (official default) or one Gaussian
per class from slca_kit's ``ClassMoments`` (``statistics: covariance``, the official ``covariance`` option).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..alignment import AlignmentSettings, ClassMoments, train_on_samples
from ..centroids import Centroids, ClassGaussians
from ..errors import ConfigError
from ..finite import ensure_finite_loss
from ..models.prompts import PromptedViT
from ..models.task_identity import TaskIdentityHead
from .base import Method, TaskContext, require_positive
from .mos import orthogonality_loss

STATISTICS = ("multi_centroid", "covariance")


class HiDePrompts(nn.Module):
    def __init__(self, layers: int, pool: int, length: int, dim: int):
        super().__init__()
        # (layers, 2 = key/value, pool, length, dim), U(-1, 1) (peft/prompt/hide_prompt.py:39-45)
        self.e = nn.Parameter(torch.empty(layers, 2, pool, length, dim).uniform_(-1, 1))


class HiDePrompt(Method):
    name = "hide_prompt"

    @classmethod
    def backbone_sources(cls, params) -> tuple[str, ...]:
        return ("timm",)  # prefixes enter timm's attention (prompts.PromptedViT)

    # Defaults: training_scripts/train_cifar100_vit.sh and configs/cifar100_hideprompt_5e.py (":N" lines there).
    @dataclass
    class Params:
        e_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # e_prompt_layer_idx (:106)
        e_length: int = 5  # --length 5 (script); ImageNet-R and CUB 20
        prompt_momentum: float = 0.01  # --prompt_momentum (script, :147)
        head_lr_scale: float = 0.1  # --larger_prompt_lr: prompts at lr, the head at lr x 0.1 (engine :224-233)
        orthogonality_weight: float = 0.1  # --reg 0.1 (script); ImageNet-R 0.5, CUB 0.01
        orthogonality_temperature: float = 0.8  # engine :539
        statistics: str = "multi_centroid"  # --ca_storage_efficient_method (:151): multi_centroid | covariance
        centroids: int = 10  # --n_centroids (:152)
        cov_ridge: float = 1e-4  # + 1e-4 I (engine :391, :467)
        ca_epochs: int = 30  # --crct_epochs 30 (both runs)
        ca_lr: float = 0.005  # --ca_lr, not batch-scaled in the prompted run (hideprompt_trainer.py)
        ca_momentum: float = 0.9  # engine :427
        # the param group's args.weight_decay wins over SGD's 5e-4 (:423-427); --weight-decay (default 0.0, :27)
        # and --weight_decay (:144) share that name and the first registered default stands
        ca_weight_decay: float = 0.0
        ca_samples_per_centroid: int = 120  # batch_size x 5 per centroid, and the batch (engine :440, :487-489)
        # task-identity classifier (the --train_inference_task_only run)
        tii_hidden: list[int] = field(default_factory=lambda: [2])  # --original_model_mlp_structure (:142)
        tii_epochs: int = 20  # --epochs 20 (script)
        tii_lr: float = 4.6875e-5  # --lr 0.0005 x batch 24 / 256 (tii_trainer.py:75-79); Adam, constant
        tii_batch_size: int = 24  # --batch-size 24 (script)
        tii_grad_clip: float = 1.0  # --clip-grad (:24)
        tii_ca_lr: float = 4.6875e-4  # --ca_lr 0.005 x 24 / 256 (tii_trainer.py:80)
        tii_ca_samples_per_centroid: int = 24  # batch_size per centroid, and the batch (hide_tii_engine.py:305)
        feature_batch_size: int = 128  # images per forward pass for the test-time task accuracy (no effect)

        def __post_init__(self):
            require_positive(self, "e_length", "orthogonality_temperature", "centroids", "ca_samples_per_centroid",
                             "tii_batch_size", "tii_ca_samples_per_centroid", "feature_batch_size")
            if self.statistics not in STATISTICS:
                raise ConfigError(f"method.params.statistics: {self.statistics!r}; expected one of {list(STATISTICS)}")
            if not self.e_layers:
                raise ConfigError("method.params.e_layers: empty; give the blocks the E-prompts enter, e.g. [0, 1, 2]")
            if not 0 <= self.prompt_momentum <= 1:
                raise ConfigError(f"method.params.prompt_momentum: {self.prompt_momentum}; must be in [0, 1]")

    def __init__(self, params, config):
        super().__init__(params, config)
        self.prompted: PromptedViT | None = None
        self.prompt_statistics: Centroids | ClassGaussians | None = None  # prompted features, own task's prompt
        self.identity_statistics: Centroids | ClassGaussians | None = None  # the frozen ViT's features
        self.identity_losses: list[list[float]] = []
        self.alignment_losses: list[dict[str, list[float]]] = []
        self._task = 0
        self._feature_source: str | None = None  # None | "own_prompt" | "frozen"
        self._batch_features: torch.Tensor | None = None

    def training_images_needed(self) -> tuple[int, str]:
        if self.params.statistics == "multi_centroid":
            return self.params.centroids, f"{self.name}'s {self.params.centroids} k-means centroids per class"
        return 2, f"{self.name}'s class covariance (torch.cov)"

    # -- structure ------------------------------------------------------------------------------------
    def grow(self, model, ctx: TaskContext) -> None:
        if self.prompted is not None:
            return
        p = self.params
        dim = model.backbone.num_features
        device = next(model.backbone.parameters()).device
        # one prompt per task: --size 10 for 10 tasks (:114), top_k 1 (:116)
        model.hide_prompts = HiDePrompts(len(p.e_layers), ctx.scenario.num_tasks, p.e_length, dim).to(device)
        model.hide_identity = TaskIdentityHead(dim, p.tii_hidden, ctx.scenario.num_classes).to(device)
        model.hide_identity.requires_grad_(False)
        self.prompted = PromptedViT(model.backbone, prefix_layers=sorted(set(p.e_layers)))
        model.feature_fn = self._feature_fn(model)

    def _feature_fn(self, model):
        def features(images: torch.Tensor) -> torch.Tensor:
            if self._feature_source == "frozen":
                return self.prompted.query(images)
            if model.training or self._feature_source == "own_prompt":
                tasks = torch.full((images.shape[0],), self._task, device=images.device)
                out = self.prompted_features(model, images, tasks, blend=model.training)
                if model.training:  # the contrastive term needs the batch's features (engine :75)
                    self._batch_features = out
                return out
            return self.prompted_features(model, images, self.identify_tasks(model, images))

        return features

    def prompted_features(self, model, images: torch.Tensor, tasks: torch.Tensor, blend: bool = False) -> torch.Tensor:
        """Features with each image's task prompt; with ``blend`` (training, task > 0) the prompt is
        ``(1 - m) P_t + m mean(P_<t)`` with the earlier prompts detached (hide_prompt.py:105-112). Each image takes
        its own prompt's key and value halves (see the differences table on the official reshape)."""
        prompts = model.hide_prompts.e[:, :, tasks]  # [layers, 2, B, length, dim]
        task = int(tasks[0]) if tasks.numel() else 0
        if blend and task > 0 and self.params.prompt_momentum > 0:
            m = self.params.prompt_momentum
            earlier = model.hide_prompts.e[:, :, :task].detach().mean(2, keepdim=True)
            prompts = (1 - m) * prompts + m * earlier
        prefixes = {layer: (prompts[i, 0], prompts[i, 1]) for i, layer in enumerate(self.params.e_layers)}
        with self.prompted.prompted(prefixes=prefixes):
            return model.backbone(images)

    @torch.no_grad()
    def identify_tasks(self, model, images: torch.Tensor) -> torch.Tensor:
        """The task of the class the task-identity classifier predicts among the seen classes (engine :117-131)."""
        sizes = torch.as_tensor(model.head.task_sizes, device=images.device)
        class_task = torch.repeat_interleave(torch.arange(len(sizes), device=images.device), sizes)
        logits = model.hide_identity(self.prompted.query(images))[:, :int(sizes.sum())]
        return class_task[logits.argmax(1)]

    # -- training -------------------------------------------------------------------------------------
    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        self._task = ctx.task
        model.backbone.requires_grad_(False)
        model.hide_identity.requires_grad_(False)
        model.hide_prompts.requires_grad_(True)
        if ctx.task > 0:  # the new prompt starts as the last one (shared_prompt_pool, engine :256-284)
            with torch.no_grad():
                model.hide_prompts.e[:, :, ctx.task] = model.hide_prompts.e[:, :, ctx.task - 1]

    def param_groups(self, model, ctx: TaskContext) -> list[dict]:
        lr = self.config.train.lr
        return [{"name": "prompts", "params": [model.hide_prompts.e], "lr": lr},
                {"name": "head", "params": list(model.head.heads[ctx.task].parameters()),
                 "lr": lr * self.params.head_lr_scale}]

    def training_loss(self, model, images, labels, ctx: TaskContext) -> torch.Tensor:
        loss = super().training_loss(model, images, labels, ctx)
        stored = None if self.prompt_statistics is None else self.prompt_statistics.means.to(ctx.device)
        contrastive = orthogonality_loss(self._batch_features.float(), stored, self.params.orthogonality_temperature)
        self._batch_features = None
        return loss + self.params.orthogonality_weight * contrastive

    # -- after the prompt epochs ------------------------------------------------------------------------
    def after_training(self, model, ctx: TaskContext) -> None:
        p = self.params
        if ctx.task > 0 and p.prompt_momentum > 0:  # engine :315-324
            with torch.no_grad():
                e = model.hide_prompts.e
                e[:, :, ctx.task] = ((1 - p.prompt_momentum) * e[:, :, ctx.task]
                                     + p.prompt_momentum * e[:, :, :ctx.task].mean(2))
        with ctx.timer("statistics"):
            new = self._statistics(model, ctx, "own_prompt")
            self.prompt_statistics = new if self.prompt_statistics is None else self.prompt_statistics.cat(new)
        with ctx.timer("task identity"):
            self.identity_losses.append(self._train_task_identity(model, ctx))
        with ctx.timer("statistics"):
            new = self._statistics(model, ctx, "frozen")
            self.identity_statistics = new if self.identity_statistics is None else self.identity_statistics.cat(new)
        if ctx.task > 0:
            with ctx.timer("alignment"):
                self.alignment_losses.append(self._align(model, ctx))

    def _statistics(self, model, ctx: TaskContext, source: str) -> Centroids | ClassGaussians:
        """The task's classes' statistics of the training images (test transform; engine :370-415)."""
        classes = ctx.scenario.task_classes(ctx.task)
        self._feature_source = source
        try:
            if self.params.statistics == "multi_centroid":  # k-means needs each class's features in one place
                features, labels, _ = ctx.gather_features(classes, "train")
                generator = torch.Generator(device=features.device).manual_seed(self._seed(ctx))
                return Centroids.fit(features, labels, classes, self.params.centroids, self.params.cov_ridge,
                                     generator)
            features, labels = ctx.extract_features(classes, "train")
            moments = ClassMoments.from_features(features, labels, classes)
            moments = ClassMoments(*(ctx.reduce_sum(t) for t in (moments.counts, moments.sums, moments.outer)))
            return ClassGaussians.from_moments(moments, classes, self.params.cov_ridge)
        finally:
            self._feature_source = None

    def _seed(self, ctx: TaskContext) -> int:
        return self.config.train.seed * 1_000 + ctx.task

    def _train_task_identity(self, model, ctx: TaskContext) -> list[float]:
        """The task-identity classifier on the frozen ViT's features of the task's augmented images: Adam, constant
        lr, cross-entropy on the task's classes, gradient norm clipped (hide_tii_engine.py:24-73, 218-235). Each
        process holds a share of each batch; the summed gradients equal one process's."""
        p = self.params
        head = model.hide_identity
        head.requires_grad_(True)
        head.train()
        parameters = list(head.parameters())
        optimizer = torch.optim.Adam(parameters, lr=p.tii_lr)  # timm 'adam', weight decay 0; new each task (:221)
        classes = ctx.scenario.task_classes(ctx.task)
        offset, size = ctx.known_classes, len(classes)
        losses = []
        bar = tqdm(range(p.tii_epochs), desc="  task identity", leave=False,
                   disable=not ctx.accelerator.is_local_main_process)
        for epoch in bar:
            total, seen = 0.0, 0.0
            for step, (images, labels) in enumerate(ctx.iterate_training_images(classes, p.tii_batch_size, epoch)):
                count = ctx.reduce_sum(torch.tensor(float(labels.shape[0]), device=ctx.device))
                logits = head(self.prompted.query(images))[:, offset:offset + size]
                loss = F.cross_entropy(logits, labels - offset, reduction="sum") / count
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                flat = ctx.reduce_sum(torch.cat([q.grad.flatten() for q in parameters]))
                torch.nn.utils.vector_to_parameters(flat, [q.grad for q in parameters])
                batch_loss = ctx.reduce_sum(loss.detach())
                ensure_finite_loss(batch_loss, "task-identity training", ctx.task, epoch, step,
                                   hint=" (lower method.params.tii_lr?)")
                torch.nn.utils.clip_grad_norm_(parameters, p.tii_grad_clip)
                optimizer.step()
                total, seen = total + float(batch_loss) * float(count), seen + float(count)
            losses.append(total / max(seen, 1.0))
        head.requires_grad_(False)
        head.eval()
        return losses

    def _align(self, model, ctx: TaskContext) -> dict[str, list[float]]:
        """Both classifiers re-trained on draws from the stored statistics of every seen class; each epoch takes
        only as many batches as there are classes of earlier tasks (``crct_num``, engine :432-433, :487-489).
        The same seed and statistics on every process give the same classifiers without synchronisation."""
        p = self.params
        device, seen, sizes = ctx.device, ctx.seen_classes, list(ctx.scenario.task_sizes[:ctx.task + 1])
        generator = torch.Generator(device=device).manual_seed(self._seed(ctx))

        def settings(lr: float, per_component: int) -> AlignmentSettings:
            return AlignmentSettings(epochs=p.ca_epochs, lr=lr, momentum=p.ca_momentum,
                                     weight_decay=p.ca_weight_decay, samples_per_class=per_component,
                                     batch_size=per_component, tau=None, mean_shrink=False)

        identity = model.hide_identity
        identity.requires_grad_(True)
        identity.train()
        identity_losses = train_on_samples(
            lambda x: identity(x)[:, :seen], list(identity.named_parameters()),
            lambda: self.identity_statistics.sample(p.tii_ca_samples_per_centroid, generator, device),
            ctx.task, sizes, settings(p.tii_ca_lr, p.tii_ca_samples_per_centroid), generator, ctx.known_classes)
        identity.requires_grad_(False)
        identity.eval()
        model.head.requires_grad_(True)  # the whole head, earlier tasks' rows too (engine :422)
        head_losses = train_on_samples(
            model.head, list(model.head.named_parameters()),
            lambda: self.prompt_statistics.sample(p.ca_samples_per_centroid, generator, device),
            ctx.task, sizes, settings(p.ca_lr, p.ca_samples_per_centroid), generator, ctx.known_classes)
        model.head.eval()
        return {"task_identity": identity_losses, "head": head_losses}

    # -- reporting, state -----------------------------------------------------------------------------
    @torch.no_grad()
    def task_summary(self, model, ctx: TaskContext) -> dict:
        """The share of seen test images whose task the task-identity classifier names (the official Acc@task)."""
        model.eval()
        class_task = torch.as_tensor(ctx.scenario.class_task_ids()[:ctx.seen_classes], device=ctx.device)
        hits = torch.zeros(2, device=ctx.device)
        for images, labels in ctx.iterate_images(list(range(ctx.seen_classes)), "test", self.params.feature_batch_size):
            hits += torch.stack([(self.identify_tasks(model, images) == class_task[labels]).sum(),
                                 torch.tensor(labels.shape[0], device=ctx.device)]).float()
        hits = ctx.reduce_sum(hits)
        return {"task_identity_accuracy": round(100.0 * float(hits[0]) / max(float(hits[1]), 1.0), 2),
                "task_identity_loss": self.identity_losses[-1][-1] if self.identity_losses[-1] else None}

    def state_dict(self) -> dict:
        return {"prompt_statistics": None if self.prompt_statistics is None else self.prompt_statistics.as_dict(),
                "identity_statistics": None if self.identity_statistics is None else self.identity_statistics.as_dict(),
                "identity_losses": self.identity_losses, "alignment_losses": self.alignment_losses}

    def load_state_dict(self, state: dict) -> None:
        kind = Centroids if self.params.statistics == "multi_centroid" else ClassGaussians
        self.prompt_statistics = kind.from_dict(state["prompt_statistics"]) if state.get("prompt_statistics") else None
        self.identity_statistics = (kind.from_dict(state["identity_statistics"])
                                    if state.get("identity_statistics") else None)
        self.identity_losses = [list(x) for x in state.get("identity_losses", [])]
        self.alignment_losses = [dict(x) for x in state.get("alignment_losses", [])]
