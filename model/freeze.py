"""Freezing the encoder for transfer learning (any model with `encoder` and `encoder_stages()`).

A frozen stage has `requires_grad=False` on its parameters and its BatchNorm layers stay in eval mode, so
that their running statistics are neither used from the batch nor updated. Because training loops call
`model.train()` every epoch, the eval mode is enforced by a forward pre-hook on each frozen BatchNorm layer
(registered here, removed on unfreezing) rather than set once.
"""
from __future__ import annotations

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

_HOOK_ATTR = "_frozen_bn_hook"


def _keep_eval(module: nn.Module, inputs: tuple) -> None:
    module.training = False


def _set_bn_frozen(module: nn.Module, frozen: bool, training: bool) -> None:
    for layer in module.modules():
        if not isinstance(layer, _BatchNorm):
            continue
        handle = getattr(layer, _HOOK_ATTR, None)
        if frozen:
            layer.eval()
            if handle is None:
                setattr(layer, _HOOK_ATTR, layer.register_forward_pre_hook(_keep_eval))
        else:
            if handle is not None:
                handle.remove()
                delattr(layer, _HOOK_ATTR)
            layer.train(training)


def set_encoder_frozen(model: nn.Module, frozen: bool, stages: int = -1) -> tuple[int, int]:
    """Freeze (or unfreeze) the first `stages` entries of `model.encoder_stages()`, or all of `model.encoder`
    when `stages` is -1. A DistributedDataParallel wrapper is looked through.

    Returns (frozen parameter count, trainable parameter count) over the whole model afterwards.
    """
    target = model.module if not hasattr(model, "encoder_stages") and hasattr(model, "module") else model
    if not hasattr(target, "encoder_stages") or not hasattr(target, "encoder"):
        raise TypeError(f"{type(target).__name__} has no `encoder` / `encoder_stages()`: it cannot be frozen by "
                        "stage; set model.freeze_encoder_epochs to 0 for this model")
    all_stages = list(target.encoder_stages())
    if stages == -1:
        modules = [target.encoder]
    elif 0 <= stages <= len(all_stages):
        modules = all_stages[:stages]
    else:
        raise ValueError(f"model.freeze_stages={stages}: {type(target).__name__} has {len(all_stages)} encoder "
                         f"stages; use -1 (the whole encoder) or a number from 0 to {len(all_stages)}")
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(not frozen)
        _set_bn_frozen(module, frozen, target.training)
    frozen_count = sum(p.numel() for p in target.parameters() if not p.requires_grad)
    trainable_count = sum(p.numel() for p in target.parameters() if p.requires_grad)
    return frozen_count, trainable_count
