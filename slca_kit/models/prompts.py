"""Prompts on an unmodified timm VisionTransformer: prompt-tuning and prefix-tuning attached with a hook and an
attention wrapper, so the same ViT without prompts is the frozen query model (one copy in memory).

- Prompt-tuning (L2P): a forward hook on ``patch_drop`` (the module right after ``_pos_embed``) prepends prompt
  tokens to the sequence, before the class token.
- Prefix-tuning (DualPrompt, CODA-Prompt): the chosen blocks' ``attn`` is wrapped; the wrapper runs timm's own
  qkv / norm / proj layers and ``scaled_dot_product_attention`` with key and value prefixes concatenated in front
  of K and V. Without prefixes it calls the wrapped module unchanged.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class PrefixAttention(nn.Module):
    """Wraps a timm ``Attention``; ``prefix`` is (key, value), each [B, Lp, dim], or None."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention
        self.prefix: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        attn = self.attention
        if self.prefix is None:
            return attn(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("prefix-tuning does not support attention masks")
        batch, tokens, _ = x.shape
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        key, value = (p.to(x.dtype).reshape(batch, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
                      for p in self.prefix)
        k = torch.cat([attn.k_norm(key), k], dim=2)
        v = torch.cat([value, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0)
        out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))


class PromptedViT:
    """Handles on one timm ViT for inserting prompt tokens and attention prefixes per forward pass."""

    def __init__(self, vit: nn.Module, prefix_layers: list[int] = ()):
        self.vit = vit
        self.tokens: torch.Tensor | None = None
        missing = [index for index in prefix_layers if not 0 <= index < len(vit.blocks)]
        if missing:
            raise ConfigError(f"method.params: prompt layers {missing} do not exist; the backbone has blocks "
                              f"0..{len(vit.blocks) - 1}")
        for index in prefix_layers:
            block = vit.blocks[index]
            if not isinstance(block.attn, PrefixAttention):
                block.attn = PrefixAttention(block.attn)
        vit.patch_drop.register_forward_hook(self._insert_tokens)

    def _insert_tokens(self, module, inputs, output):
        if self.tokens is None:
            return output
        return torch.cat([self.tokens.to(output.dtype), output], dim=1)

    def prefix_layers(self) -> dict[int, PrefixAttention]:
        return {i: block.attn for i, block in enumerate(self.vit.blocks) if isinstance(block.attn, PrefixAttention)}

    @contextlib.contextmanager
    def prompted(self, tokens: torch.Tensor | None = None,
                 prefixes: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        """Within the block, forward passes carry ``tokens`` [B, L, dim] and per-layer (key, value) prefixes."""
        layers = self.prefix_layers()
        unknown = set(prefixes or {}) - set(layers)
        if unknown:
            raise ValueError(f"no prefix wrapper on blocks {sorted(unknown)}")
        self.tokens = tokens
        for index, (key, value) in (prefixes or {}).items():
            layers[index].prefix = (key, value)
        try:
            yield
        finally:
            self.tokens = None
            for layer in layers.values():
                layer.prefix = None

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen query: the pre-logits CLS feature of the same ViT without prompts."""
        was_training = self.vit.training
        self.vit.eval()
        feature = self.vit.forward_head(self.vit.forward_features(images), pre_logits=True)
        self.vit.train(was_training)
        return feature
