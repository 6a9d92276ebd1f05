"""SSF: Scaling and Shifting your Features (Lian et al., NeurIPS 2022) on the unmodified timm ViT, through forward
hooks, where RanPAC's and APER's SSF ViT puts it (RanPAC/RanPAC petl/vision_transformer_ssf.py; the copy in
zhoudw-zdw/RevisitingCIL convs/ is the same): ``x * scale + shift`` per channel after the patch projection (:366-369),
after each block's ``norm1`` and ``norm2`` (:253-255), its attention's ``qkv`` and ``proj`` (:199, 210-211), its
MLP's ``fc1`` and ``fc2`` (:158-166), and after the final ``norm`` (:534-535)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .hooked_tuner import HookedTuner

BLOCK_TARGETS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


class ScaleShift(nn.Module):
    """One channel-wise affine map; scale ~ N(1, 0.02), shift ~ N(0, 0.02) (vision_transformer_ssf.py:378-385)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))
        self.shift = nn.Parameter(torch.empty(dim))
        with torch.no_grad():
            nn.init.normal_(self.scale, mean=1.0, std=0.02)
            nn.init.normal_(self.shift, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift  # channels last, as every hooked output (ssf_ada, :388-395)


class ScaleShiftTuner(HookedTuner):
    """A ``ScaleShift`` on each SSF site of ``vit`` (a timm ``VisionTransformer``); keys are the module paths."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        dim = vit.num_features
        self.maps = nn.ModuleDict()
        # the official scales the flattened patch tokens before the patch norm, and the norm's output if there is
        # one (:366-369): a pre-hook on timm's patch_embed.norm sees the same tokens, also when it is an Identity
        self._attach(vit.patch_embed.norm, "patch_embed", dim, before=True)
        if not isinstance(vit.patch_embed.norm, nn.Identity):
            self._attach(vit.patch_embed.norm, "patch_embed.norm", dim)
        for index, block in enumerate(vit.blocks):
            for target in BLOCK_TARGETS:
                try:
                    module = block.get_submodule(target)
                except AttributeError:
                    raise ConfigError(f"backbone: SSF needs timm ViT blocks with {', '.join(BLOCK_TARGETS)}; "
                                      f"block {index} ({type(block).__name__}) has no {target}") from None
                self._attach(module, f"blocks.{index}.{target}", getattr(module, "out_features", dim))
        self._attach(vit.norm, "norm", dim)

    def _attach(self, module: nn.Module, site: str, dim: int, before: bool = False) -> None:
        key = site.replace(".", "_")
        self.maps[key] = ScaleShift(dim)
        if before:
            def hook(module, inputs):
                return (self.maps[key](inputs[0]), *inputs[1:]) if self.enabled else None

            self._hooks.append(module.register_forward_pre_hook(hook))
        else:
            def hook(module, inputs, output):
                return self.maps[key](output) if self.enabled else None

            self._hooks.append(module.register_forward_hook(hook))
