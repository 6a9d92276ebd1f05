"""SD-LoRA: Scalable Decoupled Low-Rank Adaptation (Wu et al., ICLR 2025), as WuYichen-97/SD-Lora-CL models/sdlora.py
and backbone/lora.py do it.

Every task adds a rank-r LoRA direction on the query and value slices of every block's ``qkv`` and one magnitude
shared by all of them (``DecoupledLoRA``, models/decoupled_lora.py); earlier directions are frozen and enter
normalised, while every magnitude trains (lora.py:132-194). The directions, the magnitudes and a linear head train
with SGD (momentum 0.9, no weight decay) and cross-entropy on the task's classes (sdlora.py:92-125, 180, 225-236); the
head is PyCIL's ``SimpleLinear``, one growing linear layer (utils/inc_net.py:276-287). The test logits are the
head's over every seen class. SD-LoRA-RR lowers the new directions' rank for later tasks (``rank_reduction``; the
schedule left commented in sdlora.py:75-85). SD-LoRA-KD (``kd_threshold``; the official repository has no code for it)
follows the paper (arXiv 2501.13198 Eq. 7-8, Algorithm 1) as RL-VIG/LibContinual core/model/sd_lora.py:141-207 places
it: after each task from the second, a new direction that the earlier ones span is absorbed into their magnitudes.
The orthogonality loss the code computes is not added to the loss
(sdlora.py:225-236), so it is not computed here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from ..models.decoupled_lora import DecoupledLoRA
from .base import Method, TaskContext


class SDLoRA(Method):
    name = "sd_lora"

    @dataclass
    class Params:
        rank: int = 10  # r (utils/inc_net.py:15, models/sdlora.py:86)
        magnitude_init: float = 0.8  # scaling_factor, wrapped_param_prev (backbone/lora.py:326-328)
        # [first task, rank] pairs; SD-LoRA-RR: [[4, 8], [8, 6]] (the schedule commented in sdlora.py:75-85)
        rank_reduction: list[list[int]] = field(default_factory=list)
        # SD-LoRA-KD: residual threshold tau on ||D_t - sum_k c_k D_k||_F, 9e-4 in the paper (arXiv 2501.13198 Sec.
        # 4.1; LibContinual config/zz_SD-LoRA/sd_lora-vit-imagenetr-b10-10-20.yaml:77); None: plain SD-LoRA
        kd_threshold: float | None = None

        def __post_init__(self):
            if self.rank < 1:
                raise ConfigError(f"method.params.rank: {self.rank}; must be >= 1")
            bad = [pair for pair in self.rank_reduction if len(pair) != 2 or min(pair) < 1]
            if bad or [p[0] for p in self.rank_reduction] != sorted({p[0] for p in self.rank_reduction}):
                raise ConfigError(f"method.params.rank_reduction: {self.rank_reduction}; expected [first task, rank] "
                                  "pairs with increasing first tasks >= 1 and ranks >= 1, e.g. [[4, 8], [8, 6]]")
            if self.kd_threshold is not None and not (0 <= self.kd_threshold < float("inf")):
                raise ConfigError(f"method.params.kd_threshold: {self.kd_threshold}; must be a finite number >= 0 "
                                  "(SD-LoRA-KD: 9e-4) or null (off)")

    @classmethod
    def backbone_sources(cls, params) -> tuple[str, ...]:
        return ("timm",)  # the hook sits on timm's fused qkv Linear

    def rank_for(self, task: int) -> int:
        rank = self.params.rank
        for first_task, reduced in self.params.rank_reduction:
            if task >= first_task:
                rank = reduced
        return rank

    def grow(self, model, ctx: TaskContext) -> None:
        device = next(model.backbone.parameters()).device
        if ctx.task == 0:
            model.sd_lora = DecoupledLoRA(model.backbone.blocks, self.params.magnitude_init)
        model.sd_lora.add_task(self.rank_for(ctx.task))
        model.sd_lora.to(device)  # the new task's parameters are made on the CPU
        head = model.head.heads[ctx.task]  # SimpleLinear's init (backbone/linears.py:27-29)
        nn.init.kaiming_uniform_(head.weight, nonlinearity="linear")
        nn.init.zeros_(head.bias)

    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        model.backbone.requires_grad_(False)
        lora = model.sd_lora
        for task, (down, up) in enumerate(zip(lora.down, lora.up)):  # earlier directions frozen (lora.py:167-176)
            down.requires_grad_(task == ctx.task)
            up.requires_grad_(task == ctx.task)
        for magnitude in lora.magnitudes:  # every magnitude trains (sdlora.py:114-118: all network parameters)
            magnitude.requires_grad_(True)

    def after_training(self, model, ctx: TaskContext) -> None:
        if self.params.kd_threshold is None or ctx.task == 0:  # LibContinual sd_lora.py:145: from the second task
            return
        fits = model.sd_lora.absorb_last(self.params.kd_threshold)
        absorbed = sum(residual <= self.params.kd_threshold for _, _, residual, _ in fits)
        relative = [residual / norm for *_, residual, norm in fits if norm > 0]
        ctx.log(f"SD-LoRA-KD: {absorbed} of {len(fits)} new directions absorbed; residuals "
                f"{min(r for *_, r, _ in fits):.3g} to {max(r for *_, r, _ in fits):.3g} "
                f"({min(relative, default=0):.3f} to {max(relative, default=0):.3f} of ||D_t||)")

    def task_summary(self, model, ctx: TaskContext) -> dict:
        lora = model.sd_lora
        kept = [(down[layer, which], up[layer, which]) for down, up in zip(lora.down, lora.up)
                for layer in range(lora.layers) for which in (0, 1) if down[layer, which].any()]
        summary = {"rank": self.rank_for(ctx.task), "magnitudes": [round(float(m), 6) for m in lora.magnitudes],
                   "lora_parameters": sum(down.numel() + up.numel() for down, up in kept)}
        if self.params.kd_threshold is not None:
            summary["absorbed_directions"] = 2 * lora.layers * len(lora.down) - len(kept)
        return summary
