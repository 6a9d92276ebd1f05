"""SLCA++ (Zhang et al., arXiv 2408.08295): SLCA with a "hybrid slow learner", as the released code does it
(GengDavid/SLCA models/slca_pp.py, convs/vits.py):

- one LoRA shared by all tasks, rank 4, fixed scale 0.8, never merged; at task 0 its A is set to the top-r right
  singular vectors of W (B = 0); trained with the norms, biases and cls token. The released code defines LoRA on
  qkv, fc1 and fc2 (convs/vits.py:202-264) but its optimizer collects only parameters named ``lora_A``/``lora_B``
  (models/slca_pp.py:149-150), i.e. the qkv LoRA; the MLP LoRA (``lora_1_*``, ``lora_2_*``) never moves from
  B = 0. The recipes therefore target qkv only; qkv + fc1 + fc2 is the documented option;
- learning rates: LoRA 0.01 x 0.5 at task 0 and 0.01 x 0.1 later, other backbone parameters 1e-3, head 0.01;
- loss: symmetric cross-entropy a * CE + b * RCE on the current task's logits;
- alignment without mean shrink; each sampled feature of task t is divided by 1 + s (T - t),
  s = 0.02 + U(-0.01, 0.01) per sample; at evaluation head t's input is multiplied by 1 + 0.02 (T - t).

The LoRA is a peft LoRA from the recipe's ``adapter:`` block (recipes set r 4, lora_alpha 3.2 -> scale 0.8).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import TaskContext
from .slca import SLCA


def reverse_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, floor: float = 1e-4,
                          probability_floor: float = 1e-7) -> torch.Tensor:
    """RCE = -sum_k clamp(p_k, 1e-7, 1) log(clamp(onehot_k, 1e-4, 1)), averaged over the batch
    (GengDavid/SLCA models/slca_pp.py:124-128: both clamps)."""
    probabilities = F.softmax(logits, dim=1).clamp(min=probability_floor, max=1.0)
    onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype).clamp(min=floor, max=1.0)
    return -(probabilities * torch.log(onehot)).sum(dim=1).mean()


def svd_init_lora(backbone: torch.nn.Module, adapter_name: str = "default") -> int:
    """Set every LoRA A to the top-r right singular vectors of its base weight (B stays 0). Returns the count."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in backbone.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            weight = module.get_base_layer().weight.detach().float()
            rank = module.r[adapter_name]
            _, _, right = torch.linalg.svd(weight, full_matrices=False)
            with torch.no_grad():
                module.lora_A[adapter_name].weight.copy_(right[:rank])
                module.lora_B[adapter_name].weight.zero_()
            count += 1
    return count


class SLCAPlusPlus(SLCA):
    name = "slca_pp"

    @dataclass
    class Params(SLCA.Params):
        backbone_lr_scale: float = 0.1  # norms, biases, cls token at 1e-3 = 0.01 x 0.1 (slca.md)
        lora_lr_scale_first: float = 0.5  # LoRA lr 0.01 x 0.5 at task 0 (slca.md)
        lora_lr_scale: float = 0.1  # ... and 0.01 x 0.1 afterwards
        svd_init: bool = True  # A = top-r right singular vectors of W at task 0
        ce_weight: float = 1.0  # sce_a: 1.0 CIFAR/CUB, 0.5 IN-R/Cars (exps/slcapp/*_lora.json)
        rce_weight: float = 0.1  # sce_b: 0.1 CIFAR/CUB, 0.5 IN-R/Cars
        mean_shrink: bool = False  # SLCA++ drops the mean shrink (slca.md)
        ca_age_scale: float = 0.02  # s = 0.02 + U(-0.01, 0.01)
        ca_age_scale_jitter: float = 0.01
        eval_head_scale: float = 0.02  # head t input x (1 + 0.02 (T - t)) at evaluation

    def __init__(self, params, config):
        super().__init__(params, config)
        if config.adapter.type not in ("lora", "dora"):
            raise ConfigError("adapter.type: method slca_pp needs a LoRA adapter, e.g. adapter: {type: lora, r: 4, "
                              "lora_alpha: 3.2, target_modules: 'blocks\\.\\d+\\.attn\\.qkv', "
                              "train_backbone: [norm, bias, cls_token]} (see slca_kit/recipes/*/slca_pp.yaml)")

    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        if ctx.task == 0 and self.params.svd_init:
            svd_init_lora(model.backbone)

    def param_groups(self, model, ctx: TaskContext) -> list[dict]:
        groups = super().param_groups(model, ctx)
        scale = self.params.lora_lr_scale_first if ctx.task == 0 else self.params.lora_lr_scale
        for group in groups:
            if group["name"] == "adapter":
                group["lr"] = self.config.train.lr * scale
        return groups

    def training_loss(self, model, images: torch.Tensor, labels: torch.Tensor, ctx: TaskContext) -> torch.Tensor:
        logits = model(images)[:, ctx.known_classes:]
        targets = labels - ctx.known_classes
        return (self.params.ce_weight * F.cross_entropy(logits, targets)
                + self.params.rce_weight * reverse_cross_entropy(logits, targets))

    def alignment_settings(self):
        settings = super().alignment_settings()
        settings.age_scale = self.params.ca_age_scale
        settings.age_scale_jitter = self.params.ca_age_scale_jitter
        return settings

    def predict(self, model, images: torch.Tensor, ctx: TaskContext) -> torch.Tensor:
        if self.aligned_head is None:
            return model(images)
        features = model.features(images).float()
        head = self.aligned_head.to(features.device)
        return torch.cat([block(features * (1 + self.params.eval_head_scale * (ctx.task - t)))
                          for t, block in enumerate(head.heads)], dim=1)
