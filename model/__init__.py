"""EfficientMTNet and the comparison models, built by name: `build_model(name, **kwargs)`."""
from .registry import build_model, list_models, register_model

__all__ = ["build_model", "list_models", "register_model"]
