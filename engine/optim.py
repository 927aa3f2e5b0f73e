"""Optimisers and learning-rate schedules built from the config.

The schedule is stepped once per optimiser step. `cosine` is linear warm-up then cosine decay to `min_lr`
over a number of steps that the trainer may shorten once it knows how many epochs fit in a time budget;
`step` and `plateau` act on epoch boundaries (`plateau` on the monitored validation metric).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from utils.config import OptimConfig, SchedConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW, Adam (weight decay as an L2 term in the gradient, torch's Adam) or SGD; biases and normalisation
    weights get no weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


class LRSchedule:
    """One object for every schedule, so the trainer calls the same three methods whatever the config says."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: SchedConfig, steps_per_epoch: int, epochs: int,
                 monitor_mode: str = "max") -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.total_steps = self.steps_per_epoch * max(1, epochs)
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch)) if cfg.name == "cosine" else 0
        self.step_count = 0
        self.epoch_factor = 1.0  # step / plateau decay
        self.plateau_best: Optional[float] = None
        self.plateau_bad_epochs = 0
        self.monitor_mode = monitor_mode
        self._apply()

    def set_total_epochs(self, epochs: int) -> None:
        """Shorten (or lengthen) the cosine decay, e.g. when a time budget allows fewer epochs than configured."""
        self.total_steps = self.steps_per_epoch * max(1, epochs)
        self._apply()

    def _factor(self) -> float:
        if self.cfg.name == "cosine":
            if self.step_count < self.warmup_steps:
                return (self.step_count + 1) / (self.warmup_steps + 1)
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (self.step_count - self.warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.epoch_factor

    def _apply(self) -> None:
        factor = self._factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            if self.cfg.name == "cosine":
                min_lr = min(self.cfg.min_lr, base)
                group["lr"] = min_lr + (base - min_lr) * factor
            else:
                group["lr"] = max(base * factor, min(self.cfg.min_lr, base))

    def step_batch(self) -> None:
        self.step_count += 1
        self._apply()

    def step_epoch(self, epoch: int, metric: Optional[float] = None) -> None:
        """Call after epoch `epoch` (1-based) with the monitored validation metric."""
        if self.cfg.name == "step":
            self.epoch_factor = self.cfg.gamma ** (epoch // self.cfg.step_size)
        elif self.cfg.name == "plateau" and metric is not None and math.isfinite(metric):
            better = (self.plateau_best is None or
                      (metric > self.plateau_best if self.monitor_mode == "max" else metric < self.plateau_best))
            if better:
                self.plateau_best, self.plateau_bad_epochs = metric, 0
            else:
                self.plateau_bad_epochs += 1
                if self.plateau_bad_epochs > self.cfg.patience:
                    self.epoch_factor *= self.cfg.factor
                    self.plateau_bad_epochs = 0
        self._apply()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "step_count": self.step_count, "epoch_factor": self.epoch_factor,
                "plateau_best": self.plateau_best, "plateau_bad_epochs": self.plateau_bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self._apply()
