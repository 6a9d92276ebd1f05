"""slca_kit: continual fine-tuning of pretrained Vision Transformers (SLCA and baselines) on accelerate."""

__version__ = "0.1.0"
