"""Model registry: every entry point builds a model by name through `build_model`.

Models register themselves with the `register_model` decorator. Every registered model accepts at least
`num_classes`, `in_channels` and `deep_supervision` keyword arguments and honours the output contract:
`forward(x)` returns a dict with `cls` (B, num_classes) logits, `seg` (B, 1, H, W) logits at the input
resolution and, in training mode with deep supervision on, `aux` (list of segmentation logits).
A classification-only model (class attribute `tasks = ("cls",)`, e.g. `efficientnet_b0_cls`) returns `cls` alone:
no mask, never a fake one.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable, Dict, Mapping

import torch.nn as nn

from utils.checkpoint import unwrap_model
from utils.config import ConfigError

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a model class or factory function under `name`."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name '{name}' is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


TASKS = ("cls", "seg")  # what a model predicts unless its class attribute `tasks` says otherwise


def model_tasks(model: nn.Module) -> tuple[str, ...]:
    """The tasks `model` predicts: its `tasks` attribute (set per run by `model.loading.assign_tasks`), both
    by default. The one place that answers "does this model classify / segment?"."""
    return tuple(getattr(unwrap_model(model), "tasks", TASKS))


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


class UnknownModelError(ConfigError, KeyError):
    """`model.name` (or a `--models` entry) that no model registered under."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def check_model_name(name: str, key: str = "model.name") -> None:
    """Raise `UnknownModelError` naming `key` and the closest registered name when `name` is not registered."""
    if name in _REGISTRY:
        return
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UnknownModelError(f"{key} '{name}' is not a registered model{hint} "
                            f"(python -c \"from model import list_models; print(list_models())\")")


def check_model_kwargs(name: str, kwargs: Mapping[str, object], key: str = "model.kwargs") -> None:
    """Raise `ConfigError` naming `key.<arg>` when the registered model `name` takes no argument of that name
    (checked on the constructor's signature, before anything is built; a model taking **kwargs accepts all)."""
    check_model_name(name)
    parameters = inspect.signature(_REGISTRY[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    valid = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for arg in kwargs:
        if arg not in valid:
            close = difflib.get_close_matches(str(arg), valid, n=1)
            hint = f" Did you mean '{key}.{close[0]}'?" if close else ""
            raise ConfigError(f"config key '{key}.{arg}': model '{name}' takes no argument '{arg}'.{hint} "
                              f"Its arguments: {', '.join(valid)}")


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name` with the given constructor keyword arguments."""
    check_model_name(name)
    return _REGISTRY[name](**kwargs)
