"""The shared part of parameter-efficient modules that change an unmodified timm ViT through forward hooks: they can
be switched off (APER's pretrained branch is the same ViT with them off) and detached."""
from __future__ import annotations

import contextlib

from torch import nn


class HookedTuner(nn.Module):
    """Subclasses register their hooks with ``self._hooks.append(...)`` and consult ``self.enabled`` in them."""

    def __init__(self):
        super().__init__()
        self.enabled = True
        self._hooks = []

    @contextlib.contextmanager
    def disabled(self):
        """Within the block the ViT computes as the pretrained one."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def remove(self) -> None:
        """Detach from the ViT (it computes as before)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
