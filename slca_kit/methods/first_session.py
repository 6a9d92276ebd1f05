"""First-session adaptation, shared by APER and RanPAC (zhoudw-zdw/RevisitingCIL models/aper_adapter.py:92-117,
RanPAC/RanPAC RanPAC.py:225-236): on the first task only, AdaptFormer adapters on every block of the frozen ViT
and a cosine head train with SGD; afterwards the whole model is frozen and the method classifies with statistics
of its features."""
from __future__ import annotations

from ..errors import ConfigError
from ..models.heads import CosineHead
from ..models.parallel_adapter import ParallelAdapters
from .base import Method, TaskContext

FIRST_SESSIONS = ("adapter", "none")


def check_first_session(params) -> None:
    """For a ``Params.__post_init__`` with ``first_session``, ``adapter_bottleneck`` and ``adapter_scale``."""
    if params.first_session not in FIRST_SESSIONS:
        raise ConfigError(f"method.params.first_session: {params.first_session!r}; valid: {', '.join(FIRST_SESSIONS)}")
    if params.first_session == "adapter" and min(params.adapter_bottleneck, params.adapter_scale) <= 0:
        raise ConfigError("method.params.adapter_bottleneck and adapter_scale: must be > 0")


class FirstSessionAdaptation(Method):
    """Hooks for the first session; subclasses add what happens after each task's (non-)training."""

    @classmethod
    def backbone_sources(cls, params) -> tuple[str, ...]:
        return ("timm",) if params.first_session == "adapter" else ("timm", "transformers")

    @property
    def adapts_first_session(self) -> bool:
        return self.params.first_session == "adapter"

    def grow(self, model, ctx: TaskContext) -> None:
        if ctx.task == 0 and self.adapts_first_session:
            dim = model.backbone.num_features
            device = next(model.backbone.parameters()).device
            model.first_session_adapters = ParallelAdapters(model.backbone.blocks, dim, self.params.adapter_bottleneck,
                                                            self.params.adapter_scale).to(device)
            # the first session's classifier is PyCIL's cosine head (RanPAC inc_net.py:197-206), trained with them
            model.head.heads[0] = CosineHead(dim, ctx.scenario.task_sizes[0]).to(device)

    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)  # the current head stays trainable (DDP needs one); only task 0 trains it
        model.backbone.requires_grad_(False)  # frozen throughout; after the first session also the adapters
        if self.adapts_first_session:  # (RanPAC.py:236 freeze_backbone; aper_adapter.py:113 a frozen copy)
            model.first_session_adapters.requires_grad_(ctx.task == 0)

    def train_epochs(self, ctx: TaskContext) -> int:
        return self.config.train.epochs if ctx.task == 0 and self.adapts_first_session else 0
