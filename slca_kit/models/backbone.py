"""Create a timm ViT by name and load weights from the Hub or a local .safetensors / .pth / .npz file
(``backbone.source: transformers`` goes to ``hf_backbone``).

The ViT is timm's own, unmodified; ``num_classes=0`` makes its forward return the pre-logits feature
(the CLS token after the final norm for ``global_pool='token'``), which is SLCA's feature (slca.md, Backbones).
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from ..config import BackboneConfig
from ..errors import CheckpointError, ConfigError

CLASSIFIER_PREFIXES = ("head.", "fc.", "head_dist.")
WRAPPER_PREFIXES = ("module.", "base_encoder.", "backbone.")


def _timm_kwargs(cfg: BackboneConfig) -> dict:
    kwargs: dict = {}
    if cfg.card:
        card = json.loads(Path(cfg.card).read_text(encoding="utf-8"))
        if not isinstance(card.get("config"), dict):
            raise ConfigError(f"backbone.card: {cfg.card} has no 'config' mapping of timm model kwargs")
        kwargs.update(card["config"])
    kwargs.update(cfg.model_kwargs)
    kwargs.update(num_classes=0, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate)
    return kwargs


def _read_state_dict(path: Path, key: str | None) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or truncated files raise many different types
        raise CheckpointError(f"backbone.weights: cannot read {path}: {err}") from None
    if key is not None:
        if not isinstance(state, dict) or key not in state:
            found = list(state)[:10] if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"backbone.weights_key: {path} has no entry {key!r}; top-level entries: {found}")
        state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"backbone.weights: {path} does not hold a state dict (set backbone.weights_key)")
    return state


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP / MoCo wrapper prefixes (``module.base_encoder.blocks...`` -> ``blocks...``)."""
    cleaned = {}
    for name, tensor in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        cleaned[name] = tensor
    return cleaned


def load_weights_file(model: nn.Module, path: str | Path, key: str | None = None) -> None:
    """Load a local state dict into a timm ViT, ignoring its classifier; mismatches name the first keys."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    path = Path(path)
    state = _strip_wrappers(_read_state_dict(path, key))
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    if isinstance(model, VisionTransformer):
        state = checkpoint_filter_fn(state, model)  # resamples pos_embed, converts old layouts
    own = model.state_dict()
    shape_errors = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shape_errors or missing or unexpected:
        parts = []
        if shape_errors:
            parts.append(f"shape mismatches {shape_errors[:5]}")
        if missing:
            parts.append(f"{len(missing)} missing keys, first {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, first {unexpected[:5]}")
        raise CheckpointError(f"backbone.weights: {path} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def create_backbone(cfg: BackboneConfig) -> nn.Module:
    if cfg.source == "transformers":
        from .hf_backbone import create_transformers_backbone

        return create_transformers_backbone(cfg)
    if not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name.split(".")[0], timm.list_models(), n=3)
        raise ConfigError(f"backbone.name: {cfg.name!r} is not a timm model" + (f"; did you mean {close}?" if close
                                                                                 else ""))
    kwargs = _timm_kwargs(cfg)
    weights = Path(cfg.weights) if cfg.weights else None
    if weights is not None and weights.suffix == ".npz":
        # timm's big_vision/AugReg .npz loader (custom_load), e.g. the in21k ViT-B/16 file.
        model = timm.create_model(cfg.name, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(weights), custom_load=True), **kwargs)
    else:
        try:
            model = timm.create_model(cfg.name, pretrained=cfg.pretrained and weights is None, **kwargs)
        except (TypeError, ValueError, AssertionError, ZeroDivisionError) as err:  # kwargs timm cannot build
            raise ConfigError(f"backbone.model_kwargs: timm cannot build {cfg.name} with {cfg.model_kwargs}: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        if weights is not None:
            load_weights_file(model, weights, cfg.weights_key)
    if cfg.replace_final_norm and isinstance(getattr(model, "norm", None), nn.LayerNorm):
        # Reference: a fresh nn.LayerNorm(768) replaces the pretrained final norm (slca.md, Backbones).
        model.norm = nn.LayerNorm(model.num_features)
    return model
