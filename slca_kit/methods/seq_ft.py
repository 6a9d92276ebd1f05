"""Sequential fine-tuning baselines: one learning rate (Seq FT) and the slow learner (Seq FT w/ SL)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method


class SeqFT(Method):
    """Fine-tune the whole ViT task after task with one learning rate for backbone and head."""

    name = "seq_ft"

    @dataclass
    class Params:
        backbone_lr_scale: float = 1.0  # one lr for every parameter (SLCA paper, Seq FT baseline)


class SeqFTSlowLearner(Method):
    """Slow learner: backbone lr = head lr x 1/100 (reference bcb_lrscale, slca.md Stage 1); no alignment."""

    name = "seq_ft_sl"

    @dataclass
    class Params:
        backbone_lr_scale: float = 0.01  # reference bcb_lrscale = 1/100 (slca.md, Stage 1)
