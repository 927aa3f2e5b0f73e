"""EfficientMTNet and the comparison models, built by name: `build_model(name, **kwargs)`."""
from .registry import build_model, check_model_kwargs, check_model_name, list_models, model_tasks, register_model

# Importing a model module registers its models.
from . import efficient_mtnet  # noqa: E402,F401
from . import baselines, classifiers, hac_caspp_unet, segnext  # noqa: E402,F401

__all__ = ["build_model", "check_model_kwargs", "check_model_name", "list_models", "model_tasks", "register_model"]
