"""Backbones from ``transformers``: a Hub id or a local ``save_pretrained`` folder, loaded with the family's own
model class and left unmodified; a thin wrapper returns the pooled feature the checkpoint defines.

The feature, per family (``FAMILIES``):

- ViT (``vit``): the CLS token after the final LayerNorm (``last_hidden_state[:, 0]``), the feature SLCA uses on
  timm's ViT. ViT checkpoints may also carry a pooler (dense + tanh, the pre-logits layer of the original
  ImageNet-21k training); the ViT paper removes it for fine-tuning, and checkpoints fine-tuned with
  ``ViTForImageClassification`` have none (transformers would initialise it at random), so it is not built.
- DINOv2 (``dinov2``): its ``pooler_output``, which is the same CLS token after the final LayerNorm. The mask token
  (used only for masked-image pretraining) is frozen so that DDP sees no parameter without a gradient.
- CLIP (``clip`` / ``clip_vision_model``): the vision tower's ``pooler_output``, the CLS token after
  ``post_layernorm``, i.e. the image embedding before ``visual_projection`` (the projection maps into the space
  shared with text, which a classifier trained here does not use).
- SigLIP (``siglip`` / ``siglip_vision_model``): the vision tower's ``pooler_output``, the output of its
  attention-pooling head (SigLIP has no CLS token).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import BackboneConfig, Config
from ..errors import CheckpointError, ConfigError, first_line


@dataclass(frozen=True)
class Family:
    model_class: str  # the transformers class that loads the vision model (also from a full CLIP / SigLIP folder)
    feature: str  # "cls": last_hidden_state[:, 0]; "pooler": pooler_output
    final_norm: str | None  # the LayerNorm that produces the feature (backbone.replace_final_norm)
    init_kwargs: dict = field(default_factory=dict)
    frozen: tuple[str, ...] = ()  # parameters the feature never uses


FAMILIES = {
    "vit": Family("ViTModel", "cls", "layernorm", {"add_pooling_layer": False}),
    "dinov2": Family("Dinov2Model", "cls", "layernorm", frozen=("embeddings.mask_token",)),
    "clip": Family("CLIPVisionModel", "pooler", "post_layernorm"),
    "clip_vision_model": Family("CLIPVisionModel", "pooler", "post_layernorm"),
    # SigLIP's feature leaves the attention-pooling head, which ends in an MLP, not a norm.
    "siglip": Family("SiglipVisionModel", "pooler", None),
    "siglip_vision_model": Family("SiglipVisionModel", "pooler", None),
}


@contextlib.contextmanager
def _quiet_transformers():
    """transformers reports every unused key (a CLIP folder's text tower) and draws loading bars; the checks here
    say what matters in one line."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()



def model_type(cfg: BackboneConfig) -> str:
    from transformers import AutoConfig

    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(cfg.name, revision=cfg.revision)
    except (OSError, ValueError) as err:
        where = "local folder" if Path(cfg.name).exists() else "Hub id (no network? point it at a local folder)"
        raise ConfigError(f"backbone.name: cannot load a transformers config from {cfg.name!r} as a {where}: "
                          f"{first_line(err)}") from None
    if config.model_type not in FAMILIES:
        raise ConfigError(f"backbone.name: {cfg.name!r} is a {config.model_type!r} checkpoint; backbone.source "
                          f"transformers supports {', '.join(sorted(FAMILIES))}")
    return config.model_type


class TransformersBackbone(nn.Module):
    """images -> the family's pooled feature. ``model`` is the unmodified transformers model (peft injects into
    it); ``num_features`` is the feature width, as on timm models."""

    def __init__(self, model: nn.Module, family: Family):
        super().__init__()
        self.model = model
        self.feature = family.feature
        self.num_features = model.config.hidden_size
        self.config_image_size = model.config.image_size
        # ViT / CLIP / SigLIP take other sizes only when asked; DINOv2 always interpolates.
        self._interpolates = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self._interpolates and tuple(images.shape[-2:]) != (self.config_image_size,) * 2:
            kwargs["interpolate_pos_encoding"] = True
        output = self.model(pixel_values=images, **kwargs)
        return output.last_hidden_state[:, 0] if self.feature == "cls" else output.pooler_output


def create_transformers_backbone(cfg: BackboneConfig) -> TransformersBackbone:
    import transformers

    kind = model_type(cfg)
    family = FAMILIES[kind]
    model_class = getattr(transformers, family.model_class)
    try:
        with _quiet_transformers():
            if cfg.pretrained:
                model, info = model_class.from_pretrained(cfg.name, revision=cfg.revision, output_loading_info=True,
                                                          **family.init_kwargs, **cfg.model_kwargs)
            else:
                config = model_class.config_class.from_pretrained(cfg.name, revision=cfg.revision, **cfg.model_kwargs)
                model, info = model_class(config, **family.init_kwargs), {"missing_keys": []}
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"backbone: transformers cannot build {family.model_class} from {cfg.name!r} with "
                          f"model_kwargs {cfg.model_kwargs}: {first_line(err)}") from None
    missing = sorted(info["missing_keys"])
    if missing:
        raise CheckpointError(f"backbone.name: {cfg.name} lacks {len(missing)} weights of its {family.model_class}, "
                              f"first {missing[:5]}; they would start random")
    if cfg.replace_final_norm:
        if family.final_norm is None:
            raise ConfigError(f"backbone.replace_final_norm: a {kind} feature comes from its attention-pooling head, "
                              "which ends without a norm to replace; set it to false")
        old = getattr(model, family.final_norm)
        # Reference: a fresh LayerNorm replaces the pretrained final norm (slca.md, Backbones), as on timm.
        setattr(model, family.final_norm, nn.LayerNorm(old.normalized_shape, eps=old.eps))
    for name, parameter in model.named_parameters():
        if name in family.frozen:
            parameter.requires_grad_(False)
    return TransformersBackbone(model, family)


def image_processor_settings(cfg: BackboneConfig) -> dict:
    """``{"mean", "std", "image_size"}`` from the checkpoint's image processor (the crop size when it crops, else
    its resize size); ``{}`` when the checkpoint has none."""
    from transformers import AutoImageProcessor

    try:
        with _quiet_transformers():
            processor = AutoImageProcessor.from_pretrained(cfg.name, revision=cfg.revision)
    except (OSError, ValueError):
        return {}
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    side = getattr(size, "height", None) or getattr(size, "shortest_edge", None)
    if side is None and isinstance(size, dict):
        side = size.get("height") or size.get("shortest_edge")
    settings = {"mean": [float(v) for v in processor.image_mean], "std": [float(v) for v in processor.image_std]}
    if side:
        settings["image_size"] = int(side)
    return settings


def fill_image_settings(config: Config) -> None:
    """Fill ``data.mean`` / ``data.std`` / ``data.image_size`` left unset (None) for a transformers backbone from
    its image processor; an unset one without a processor is an error naming the key."""
    unset = [key for key in ("mean", "std", "image_size") if getattr(config.data, key) is None]
    if not unset:
        return
    settings = image_processor_settings(config.backbone)
    for key in unset:
        if key not in settings:
            raise ConfigError(f"data.{key}: not set, and {config.backbone.name} has no image processor "
                              "(preprocessor_config.json) to take it from; set data.mean, data.std and "
                              "data.image_size in the recipe")
        setattr(config.data, key, settings[key])
