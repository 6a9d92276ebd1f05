"""Method registry: a recipe's ``method.name`` picks a class here; ``register_method`` adds a plug-in."""
from __future__ import annotations

import dataclasses

from ..config import build_dataclass
from ..errors import ConfigError
from .aper import APER
from .base import Method, TaskContext
from .coda_prompt import CodaPrompt
from .cofima import CoFiMA
from .den import DEN
from .dualprompt import DualPrompt
from .ease import EASE
from .fecam import FeCAM
from .generative_replay import GenerativeFeatureReplay
from .hide_prompt import HiDePrompt
from .inflora import InfLoRA
from .l2p import L2P
from .joint import Joint
from .linear_probe import LinearProbe
from .lwf import LwF
from .mos import MOS
from .packnet import PackNet
from .progressive import ProgressiveNetworks
from .ranpac import RanPAC
from .regularization import EWC, MAS, SI
from .replay import Replay
from .sd_lora import SDLoRA
from .seq_ft import SeqFT, SeqFTSlowLearner
from .slca import SLCA
from .slca_pp import SLCAPlusPlus

# The state of the art on class statistics, each file following its official code: RanPAC/RanPAC RanPAC.py,
# dipamgoswami/FeCAM FeCAM_vit_cifar100.py, IemProg/CoFiMA models/cofima.py, zhoudw-zdw/RevisitingCIL
# models/aper_adapter.py (file and line per step in each module). Adapters grown per task on the frozen ViT:
# sun-hailong/CVPR24-Ease models/ease.py, sun-hailong/AAAI25-MOS models/mos.py, WuYichen-97/SD-Lora-CL
# models/sdlora.py. Prompts with a task-identity classifier: thu-ml/HiDe-Prompt engines/*.py.
METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    SeqFT, SeqFTSlowLearner, SLCA, SLCAPlusPlus, Joint, LinearProbe, InfLoRA, L2P, DualPrompt, CodaPrompt,
    EWC, MAS, SI, LwF, Replay, GenerativeFeatureReplay, PackNet, ProgressiveNetworks, DEN,
    RanPAC, FeCAM, CoFiMA, APER, EASE, MOS, SDLoRA, HiDePrompt)}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator for methods defined outside slca_kit: ``@register_method class MyMethod(Method): ...``."""
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def validate_method_params(name: str, params):
    """Turn ``method.params`` into the method's typed ``Params`` (unknown keys and wrong types are errors)."""
    cls = method_class(name)
    if dataclasses.is_dataclass(params):
        params = dataclasses.asdict(params)
    params = build_dataclass(cls.Params, params, "method.params")
    for field in dataclasses.fields(params):  # lrs, epochs, sizes, weights, thresholds: none is negative
        value = getattr(params, field.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"method.params.{field.name}: must be >= 0, got {value}")
    return params


def build_method(config) -> Method:
    cls = method_class(config.method.name)
    return cls(validate_method_params(config.method.name, config.method.params), config)


__all__ = ["METHODS", "Method", "TaskContext", "build_method", "method_class", "register_method"]
