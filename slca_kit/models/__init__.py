"""Backbones (timm ViTs with local or Hub weights, or transformers vision models) and the incremental classifier."""
from .backbone import create_backbone, load_weights_file
from .continual import ContinualModel, build_model
from .heads import IncrementalHead

__all__ = ["ContinualModel", "IncrementalHead", "build_model", "create_backbone", "load_weights_file"]
