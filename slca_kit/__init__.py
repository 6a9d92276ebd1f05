"""slca_kit: continual fine-tuning of pretrained Vision Transformers (SLCA and baselines) on accelerate."""

__version__ = "0.1.0"


def __getattr__(name):  # ``from slca_kit import load_run`` without importing torch for ``import slca_kit``
    if name == "load_run":
        from .inference import load_run

        return load_run
    raise AttributeError(f"module 'slca_kit' has no attribute {name!r}")
