"""Building a registry model from a saved checkpoint: constructor arguments from its config, strict weight
loading with an architecture check that explains a mismatch."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from utils.checkpoint import CheckpointError, config_of, read_checkpoint, unwrap_model
from utils.config import Config, ConfigError

from .registry import build_model, model_tasks


def load_weights(model: nn.Module, state_dict: dict, source: str, model_name: Optional[str] = None) -> None:
    """Strictly load `state_dict`, explaining an architecture mismatch instead of dumping key lists."""
    target = unwrap_model(model)
    own = target.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong_shape:
        saved = f" (saved from model '{model_name}')" if model_name else ""
        details = []
        if missing:
            details.append(f"{len(missing)} missing tensors, e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]}")
        if wrong_shape:
            k = wrong_shape[0]
            details.append(f"{len(wrong_shape)} shape mismatches, e.g. {k}: {tuple(state_dict[k].shape)} vs "
                           f"{tuple(own[k].shape)}")
        raise CheckpointError(
            f"checkpoint '{source}'{saved} does not match the {type(target).__name__} architecture built here: "
            f"{'; '.join(details)}. Build the model with the config stored in the checkpoint (test.py does this).")
    target.load_state_dict(state_dict, strict=True)


def load_model_from_checkpoint(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                               use_ema: bool = True) -> tuple[nn.Module, Config, dict]:
    """Rebuild the model from the config stored in a checkpoint and load its weights (EMA ones when present).

    Returns (model in eval mode on `device`, config, raw checkpoint dict).
    """
    ckpt = read_checkpoint(path)
    model, cfg = model_from_checkpoint(ckpt, path, device, use_ema)
    return model, cfg, ckpt


def model_from_checkpoint(ckpt: dict, path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                          use_ema: bool = True) -> tuple[nn.Module, Config]:
    """(model in eval mode on `device`, config) from a checkpoint's contents (`read_checkpoint(path)`); `path`
    names it in errors."""
    cfg = config_of(ckpt, path)
    try:
        model = build_model(cfg.model.name, **model_kwargs(cfg, pretrained=False))
    except KeyError as exc:  # a model name this version does not register
        raise CheckpointError(f"checkpoint '{path}' holds a model this version cannot build: {exc.args[0]}") from exc
    except (TypeError, ValueError) as exc:  # constructor arguments from another version of the model
        raise CheckpointError(f"checkpoint '{path}' holds '{cfg.model.name}' settings this version cannot build "
                              f"it with ({exc})") from exc
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    load_weights(model, weights, str(path), ckpt.get("model_name"))
    assign_tasks(model, cfg)
    return model.to(device).eval(), cfg


TASKS = ("cls", "seg")


def assign_tasks(model: nn.Module, cfg: Config) -> tuple[str, ...]:
    """Set and return `model.tasks`: the tasks the model predicts (its class attribute `tasks`, both by default)
    that the run trains (`loss.cls_weight` / `loss.seg_weight` > 0).

    A single-task run of a two-head model (e.g. `loss.cls_weight: 0`) evaluates the trained head alone:
    `evaluation.inference.predict` drops the outputs of the other task, so no untrained head reaches a table.
    A loss that scores a task the model does not predict is a `ConfigError` naming the key.
    """
    declared = model_tasks(model)
    weights = {"cls": ("loss.cls_weight", cfg.loss.cls_weight), "seg": ("loss.seg_weight", cfg.loss.seg_weight)}
    for task, (key, weight) in weights.items():
        if weight > 0 and task not in declared:
            what = "classification" if task == "cls" else "segmentation"
            raise ConfigError(f"config key '{key}': model '{cfg.model.name}' has no {what} output, so {key} "
                              f"must be 0 (got {weight:g}){' and loss.aux_weights=[]' if task == 'seg' else ''}")
    tasks = tuple(task for task in declared if weights[task][1] > 0)
    model.tasks = tasks
    return tasks


def model_kwargs(cfg: Config, pretrained: bool = True) -> dict:
    """Constructor arguments of the configured model.

    `pretrained=False` leaves out `model.pretrained`: a model whose weights come from a checkpoint must not
    need the network (or the original weights file) to load encoder weights that the checkpoint overwrites.
    """
    kwargs = {
        "num_classes": cfg.model.num_classes,
        "in_channels": cfg.data.preprocess.in_channels,
        "deep_supervision": cfg.model.deep_supervision,
    }
    if pretrained and cfg.model.pretrained:
        kwargs["pretrained"] = cfg.model.pretrained
    kwargs.update(cfg.model.kwargs)
    return kwargs
