"""RanPAC: Random Projections and Pre-trained models for Continual learning (McDonnell et al., NeurIPS 2023), as
RanPAC/RanPAC RanPAC.py does it.

First session (``first_session``, ``FirstSessionAdaptation``): AdaptFormer adapters on every block, SSF or deep VPT
(models/parallel_adapter.py, ssf.py, visual_prompts.py) and a cosine head train on the first task only
(RanPAC.py:225-236), then everything is frozen; ``none`` trains nothing (the "ncm" rows of args/*_publish.csv). After
every task the training images' features under the TEST transform (RanPAC.py:167, ``mode="test"``) go through a frozen
Gaussian random projection with ReLU to M dimensions (RanPAC.py:119, 254). The Gram matrix G = sum H^T H and the class
sums Q = sum H^T Y accumulate over tasks (RanPAC.py:122-123); the classifier is the ridge solution W = (G + lambda
I)^-1 Q (RanPAC.py:125), with lambda chosen on this task's data alone (RanPAC.py:124, 138-150). Logits are relu(f
W_rand) W (inc_net.py:34-39).

G and Q are computed from every process's features gathered in split order, so any number of processes gives the
same G, Q and W.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import TaskContext
from .first_session import FirstSessionAdaptation, check_first_session


def ridge_readout(gram: torch.Tensor, class_sums: torch.Tensor, ridge: float) -> torch.Tensor:
    """W^T = ((G + ridge I)^-1 Q)^T: [classes, M] (RanPAC.py:125, ``torch.linalg.solve``, not an inverse)."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, class_sums).T


def choose_ridge(hidden: torch.Tensor, targets: torch.Tensor, ridges: list[float], train_fraction: float,
                 order: torch.Tensor) -> float:
    """The ridge with the least mean squared error on the last (1 - train_fraction) of ``order``, fitted on the
    first part (RanPAC.py:138-150; the official order is its shuffled loader's). Columns of classes absent from
    ``targets`` would add the same zero error for every ridge, so only this task's classes are scored."""
    hidden, targets = hidden[order], targets[order]
    cut = int(hidden.shape[0] * train_fraction)
    gram = hidden[:cut].T @ hidden[:cut]
    sums = hidden[:cut].T @ targets[:cut]
    losses = [F.mse_loss(hidden[cut:] @ ridge_readout(gram, sums, ridge).T, targets[cut:]).item()
              for ridge in ridges]
    return ridges[min(range(len(ridges)), key=losses.__getitem__)]  # the first of equal losses, as np.argmin


class RanPAC(FirstSessionAdaptation):
    name = "ranpac"

    @dataclass
    class Params:
        # M (args/*_publish.csv column M: 10000); 0 projects nothing: ridge regression on the features themselves
        # (the "RP with M = 0" rows, RanPAC.py:120, 257).
        projection_dim: int = 10000
        # adapter: AdaptFormer first session (args/cifar224_publish.csv, cub_publish.csv rows 5-7); ssf
        # (imagenetr_publish.csv rows 5-7); vpt_deep (cars_publish.csv rows 5-7); none: frozen pretrained ViT
        # throughout (rows 2-4).
        first_session: str = "adapter"
        adapter_bottleneck: int = 64  # ffn_num (inc_net.py:115)
        adapter_scale: float = 0.1  # ffn_adapter_scalar "0.1" (inc_net.py:124)
        adapter_dropout: float = 0.1  # after the ReLU, training (petl/vision_transformer_adapter.py:77, 159)
        prompt_tokens: int = 5  # Prompt_Token_num, VPT_type "Deep" (inc_net.py:103-106)
        ridges: list[float] = field(default_factory=lambda: [10.0 ** k for k in range(-8, 9)])  # RanPAC.py:139
        ridge_train_fraction: float = 0.8  # RanPAC.py:140

        def __post_init__(self):
            check_first_session(self)
            if not self.ridges or not all(isinstance(r, (int, float)) and 0 < r < float("inf") for r in self.ridges):
                raise ConfigError(f"method.params.ridges: a non-empty list of positive numbers, got {self.ridges}")
            if not 0 < self.ridge_train_fraction < 1:
                raise ConfigError("method.params.ridge_train_fraction: must be between 0 and 1 (exclusive), got "
                                  f"{self.ridge_train_fraction}")

    def __init__(self, params, config):
        super().__init__(params, config)
        self.gram: torch.Tensor | None = None  # [M, M] float32, on CPU between tasks (RanPAC.py:260)
        self.class_sums: torch.Tensor | None = None  # [M, seen classes]
        self.readout: torch.Tensor | None = None  # [seen classes, M]
        self.chosen_ridges: list[float] = []
        self._projection: dict[torch.device, torch.Tensor] = {}

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """relu(f W_rand) with W_rand ~ N(0, 1), [d, M] (RanPAC.py:254), drawn from ``train.seed``; or f itself."""
        if self.params.projection_dim == 0:
            return features
        if features.device not in self._projection:
            generator = torch.Generator().manual_seed(self.config.train.seed)
            weights = torch.randn(features.shape[1], self.params.projection_dim, generator=generator)
            self._projection[features.device] = weights.to(features.device)
        return torch.relu(features @ self._projection[features.device])

    def after_training(self, model, ctx: TaskContext) -> None:
        classes = ctx.scenario.task_classes(ctx.task)
        with ctx.timer("statistics"):
            features, labels, _ = ctx.gather_features(classes, "train")
            hidden = self.project(features.float())
            targets = F.one_hot(labels - ctx.known_classes, len(classes)).float()
            gram, sums = hidden.T @ hidden, hidden.T @ targets
            if self.gram is None:
                self.gram, self.class_sums = gram.cpu(), sums.cpu()
            else:
                self.gram += gram.cpu()
                self.class_sums = torch.cat([self.class_sums, sums.cpu()], dim=1)
        with ctx.timer("ridge"):
            generator = torch.Generator().manual_seed(self.config.train.seed * 1_000 + ctx.task)
            order = torch.randperm(hidden.shape[0], generator=generator).to(hidden.device)
            ridge = choose_ridge(hidden, targets, self.params.ridges, self.params.ridge_train_fraction, order)
            self.chosen_ridges.append(ridge)
            ctx.log(f"task {ctx.task}: ridge {ridge:g}")
            self.readout = ridge_readout(self.gram.to(ctx.device), self.class_sums.to(ctx.device), ridge).cpu()

    def predict(self, model, images: torch.Tensor, ctx: TaskContext) -> torch.Tensor:
        hidden = self.project(model.features(images).float())
        return hidden @ self.readout.to(hidden.device).T

    def task_summary(self, model, ctx: TaskContext) -> dict:
        return {"ridge": self.chosen_ridges[-1]}

    def state_dict(self) -> dict:
        return {"gram": self.gram, "class_sums": self.class_sums, "readout": self.readout,
                "chosen_ridges": self.chosen_ridges}

    def load_state_dict(self, state: dict) -> None:
        self.gram, self.class_sums, self.readout = state["gram"], state["class_sums"], state["readout"]
        self.chosen_ridges = list(state.get("chosen_ridges", []))
