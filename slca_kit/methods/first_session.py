"""First-session adaptation, shared by APER and RanPAC (zhoudw-zdw/RevisitingCIL models/aper_adapter.py:92-117,
aper_ssf.py:94-128, aper_vpt.py:98-121; RanPAC/RanPAC RanPAC.py:225-236): on the first task only, a parameter-efficient
module on the frozen ViT and a cosine head train with SGD; afterwards the whole model is frozen and the method
classifies with statistics of its features. The modules, each attached by forward hooks:

- ``adapter``: AdaptFormer parallel adapters on every block (utils/inc_net.py:94-119, RanPAC inc_net.py:116-141);
- ``ssf``: scale-and-shift after every linear and norm (utils/inc_net.py:45-66, RanPAC inc_net.py:78-89);
- ``vpt_deep`` / ``vpt_shallow``: prompt tokens (utils/inc_net.py:72-89, RanPAC inc_net.py:94-111: always deep);
- ``none``: nothing trains."""
from __future__ import annotations

from ..errors import ConfigError
from ..models.heads import CosineHead
from ..models.hooked_tuner import HookedTuner
from ..models.parallel_adapter import ParallelAdapters
from ..models.ssf import ScaleShiftTuner
from ..models.visual_prompts import VisualPrompts
from .base import Method, TaskContext

FIRST_SESSIONS = ("adapter", "ssf", "vpt_deep", "vpt_shallow", "none")


def check_first_session(params) -> None:
    """For a ``Params.__post_init__`` with ``first_session``, ``adapter_bottleneck``, ``adapter_scale``,
    ``adapter_dropout`` and ``prompt_tokens``."""
    if params.first_session not in FIRST_SESSIONS:
        raise ConfigError(f"method.params.first_session: {params.first_session!r}; valid: {', '.join(FIRST_SESSIONS)}")
    if params.first_session == "adapter" and min(params.adapter_bottleneck, params.adapter_scale) <= 0:
        raise ConfigError("method.params.adapter_bottleneck and adapter_scale: must be > 0")
    if not 0 <= params.adapter_dropout < 1:
        raise ConfigError(f"method.params.adapter_dropout: {params.adapter_dropout}; must be in [0, 1)")
    if params.first_session.startswith("vpt") and params.prompt_tokens < 1:
        raise ConfigError(f"method.params.prompt_tokens: {params.prompt_tokens}; must be >= 1")


def first_session_tuner(vit, params) -> HookedTuner:
    """The module ``params.first_session`` names, attached to the timm ViT ``vit``."""
    if params.first_session == "adapter":
        return ParallelAdapters(vit.blocks, vit.num_features, params.adapter_bottleneck, params.adapter_scale,
                                params.adapter_dropout)
    if params.first_session == "ssf":
        return ScaleShiftTuner(vit)
    return VisualPrompts(vit.blocks, vit.num_features, params.prompt_tokens, deep=params.first_session == "vpt_deep")


class FirstSessionAdaptation(Method):
    """Hooks for the first session; subclasses add what happens after each task's (non-)training."""

    @classmethod
    def backbone_sources(cls, params) -> tuple[str, ...]:
        return ("timm", "transformers") if params.first_session == "none" else ("timm",)

    @property
    def adapts_first_session(self) -> bool:
        return self.params.first_session != "none"

    def grow(self, model, ctx: TaskContext) -> None:
        if ctx.task == 0 and self.adapts_first_session:
            dim = model.backbone.num_features
            device = next(model.backbone.parameters()).device
            model.first_session_tuner = first_session_tuner(model.backbone, self.params).to(device)
            # the first session's classifier is PyCIL's cosine head (RanPAC inc_net.py:197-206), trained with them
            model.head.heads[0] = CosineHead(dim, ctx.scenario.task_sizes[0]).to(device)

    def before_task(self, model, ctx: TaskContext) -> None:
        super().before_task(model, ctx)  # the current head stays trainable (DDP needs one); only task 0 trains it
        model.backbone.requires_grad_(False)  # frozen throughout; after the first session also the tuner
        if self.adapts_first_session:  # (RanPAC.py:178-187, 236 freeze_backbone; aper_ssf.py:94-110)
            model.first_session_tuner.requires_grad_(ctx.task == 0)

    def train_epochs(self, ctx: TaskContext) -> int:
        return self.config.train.epochs if ctx.task == 0 and self.adapts_first_session else 0
