"""Generative replay at feature level (lifelong_methods.md, 3): after each task a class-conditional generator of
that task's backbone features is fitted; while later tasks train, every batch of real images is joined by as many
generated features of earlier classes, and one cross-entropy over all seen classes trains the heads on both.

The backbone is frozen by default (``backbone_lr_scale: 0``) so that stored generators keep describing the
features the heads see -- replay at the level of a frozen pretrained feature extractor, as in brain-inspired
replay (van de Ven et al. 2020). With a slow learner instead, earlier generators describe older features.

Generators (``generator``): ``gaussian`` (per-class mean and full covariance, reduced exactly over processes) or
``cvae`` (a conditional VAE, MLP encoder/decoder, trained on the task's features gathered from all processes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..alignment import ClassMoments, cholesky_with_jitter
from ..errors import ConfigError
from ..finite import ensure_finite_loss
from .base import Method, TaskContext, require_positive


class ConditionalVAE(nn.Module):
    """x | class c: encoder q(z | x, c), decoder p(x | z, c) with Gaussian output (mean only, MSE loss)."""

    def __init__(self, feature_dim: int, num_classes: int, hidden: int, latent: int):
        super().__init__()
        self.num_classes, self.latent = num_classes, latent
        self.encoder = nn.Sequential(nn.Linear(feature_dim + num_classes, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent + num_classes, hidden), nn.ReLU(),
                                     nn.Linear(hidden, feature_dim))

    def loss(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(classes, self.num_classes).to(features.dtype)
        mean, log_var = self.encoder(torch.cat([features, onehot], 1)).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        reconstruction = self.decoder(torch.cat([z, onehot], 1))
        kl = 0.5 * (mean ** 2 + log_var.exp() - 1 - log_var).sum(1)
        return (F.mse_loss(reconstruction, features, reduction="none").sum(1) + kl).mean()

    @torch.no_grad()
    def sample(self, classes: torch.Tensor) -> torch.Tensor:
        z = torch.randn(len(classes), self.latent, device=classes.device)
        return self.decoder(torch.cat([z, F.one_hot(classes, self.num_classes).float()], 1))


class GaussianGenerator(nn.Module):
    """One Gaussian (mean, Cholesky factor of the covariance) per class."""

    def __init__(self, means: torch.Tensor, chol: torch.Tensor):
        super().__init__()
        self.register_buffer("means", means.float())
        self.register_buffer("chol", chol.float())

    @torch.no_grad()
    def sample(self, classes: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(len(classes), self.means.shape[1], device=classes.device)
        return self.means[classes] + torch.einsum("nij,nj->ni", self.chol[classes], noise)


class GenerativeFeatureReplay(Method):
    name = "generative_replay"

    @dataclass
    class Params:
        backbone_lr_scale: float = 0.0  # frozen feature extractor (van de Ven et al. 2020)
        generator: str = "cvae"  # cvae | gaussian
        replay_ratio: float = 1.0  # generated features per real image in a batch
        cov_ridge: float = 1e-4  # gaussian: covariance + ridge * I (as SLCA's statistics)
        # The CVAE loss weighs reconstruction and KL 1:1, as brain-inspired replay's defaults (--recon-weight,
        # --variat-weight, GMvandeVen/brain-inspired-replay options.py:173-174), which replays features too
        # (--hidden, options.py:235); its sizes below are ours, for 192-768-d ViT features.
        cvae_hidden: int = 512
        cvae_latent: int = 64
        cvae_epochs: int = 100
        cvae_lr: float = 1e-3  # Adam
        cvae_batch_size: int = 64

        def __post_init__(self):
            require_positive(self, "cvae_hidden", "cvae_latent", "cvae_batch_size")
            if self.generator not in ("cvae", "gaussian"):
                raise ConfigError(f"method.params.generator: {self.generator!r} is not one of cvae, gaussian")
            if self.replay_ratio < 0:
                raise ConfigError(f"method.params.replay_ratio: must be >= 0, got {self.replay_ratio}")

    def __init__(self, params, config):
        super().__init__(params, config)
        self.generators = nn.ModuleList()  # one per finished task, over that task's classes

    def training_images_needed(self) -> tuple[int, str]:
        if self.params.generator == "gaussian":
            return 2, "generative_replay's gaussian generator (a class covariance)"
        return 1, self.name

    def before_task(self, model, ctx: TaskContext) -> None:
        model.head.requires_grad_(True)
        if self.params.backbone_lr_scale == 0:
            model.backbone.requires_grad_(False)

    def sample_replay(self, count: int, ctx: TaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` generated features of earlier classes (classes drawn uniformly) and their labels."""
        labels = torch.randint(0, ctx.known_classes, (count,), device=ctx.device)
        parts, part_labels = [], []
        for task, generator in enumerate(self.generators):
            offset, size = ctx.scenario.task_offset(task), ctx.scenario.task_sizes[task]
            members = (labels >= offset) & (labels < offset + size)
            if members.any():
                parts.append(generator.to(ctx.device).sample(labels[members] - offset))
                part_labels.append(labels[members])
        return torch.cat(parts), torch.cat(part_labels)

    def training_loss(self, model, images, labels, ctx: TaskContext) -> torch.Tensor:
        count = int(round(self.params.replay_ratio * len(images)))
        if ctx.task == 0 or count == 0:
            return F.cross_entropy(model(images), labels)
        replayed, replayed_labels = self.sample_replay(count, ctx)
        logits = model(images, extra_features=replayed)
        return F.cross_entropy(logits, torch.cat([labels, replayed_labels]))

    def after_training(self, model, ctx: TaskContext) -> None:
        classes = ctx.scenario.task_classes(ctx.task)
        with ctx.timer("generator"):
            if self.params.generator == "gaussian":
                features, labels = ctx.extract_features(classes, "train")
                moments = ClassMoments.from_features(features, labels, classes)
                moments = ClassMoments(*(ctx.reduce_sum(t) for t in (moments.counts, moments.sums, moments.outer)))
                means, covs = moments.gaussians(self.params.cov_ridge)
                chol, _ = cholesky_with_jitter(covs)
                self.generators.append(GaussianGenerator(means.cpu(), chol.cpu()))
            else:
                features, labels, _ = ctx.gather_features(classes, "train")
                self.generators.append(self.fit_cvae(features, labels - classes[0], len(classes), ctx).cpu())

    def fit_cvae(self, features, classes, num_classes: int, ctx: TaskContext) -> ConditionalVAE:
        """Same data, seed and steps on every process, so every process ends with the same generator."""
        params = self.params
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            torch.manual_seed(self.config.train.seed * 1_000 + ctx.task)
            cvae = ConditionalVAE(features.shape[1], num_classes, params.cvae_hidden, params.cvae_latent).to(ctx.device)
            optimizer = torch.optim.Adam(cvae.parameters(), lr=params.cvae_lr)
            for epoch in range(params.cvae_epochs):
                order = torch.randperm(len(features), device=features.device)
                for step, start in enumerate(range(0, len(order), params.cvae_batch_size)):
                    batch = order[start:start + params.cvae_batch_size]
                    loss = cvae.loss(features[batch], classes[batch])
                    ensure_finite_loss(loss, "cvae generator", ctx.task, epoch, step,
                                       hint=" (lower method.params.cvae_lr?)")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        return cvae.eval().requires_grad_(False)

    def state_dict(self) -> dict:
        return {"generators": [{k: v.cpu() for k, v in g.state_dict().items()} for g in self.generators],
                "kinds": [type(g).__name__ for g in self.generators]}

    def load_state_dict(self, state: dict) -> None:
        self.generators = nn.ModuleList()
        for kind, weights in zip(state["kinds"], state["generators"]):
            if kind == "GaussianGenerator":
                self.generators.append(GaussianGenerator(weights["means"], weights["chol"]))
                continue
            feature_dim = weights["decoder.2.weight"].shape[0]
            hidden, latent_plus_classes = weights["decoder.0.weight"].shape
            num_classes = weights["encoder.0.weight"].shape[1] - feature_dim
            cvae = ConditionalVAE(feature_dim, num_classes, hidden, latent_plus_classes - num_classes)
            cvae.load_state_dict(weights)
            self.generators.append(cvae.eval().requires_grad_(False))

    def task_summary(self, model, ctx: TaskContext) -> dict:
        return {"generator_parameters": sum(t.numel() for g in self.generators for t in g.state_dict().values())}
