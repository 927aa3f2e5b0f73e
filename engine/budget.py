"""When training ends: the configured epochs, a wall-clock budget (and how many epochs still fit in it) or early
stopping. Pure decisions; under DDP the trainer takes rank 0's and broadcasts it."""
from __future__ import annotations

from typing import Optional

from utils.config import TrainConfig

# Why training ended, as broadcast by rank 0 (0: it goes on) and saved in checkpoints as `stopped`.
STOP_KINDS = {1: "epochs", 2: "time_budget", 3: "early_stop"}


def epochs_that_fit(train_cfg: TrainConfig, epoch: int, time_left: float, epoch_seconds: list[float]) -> int:
    """The epoch count to plan for: as many as the remaining budget allows (mean of the last 3 epochs), at least
    the epochs done, at most the configured ones."""
    per_epoch = sum(epoch_seconds[-3:]) / len(epoch_seconds[-3:])
    return max(epoch, min(train_cfg.epochs, epoch + int(time_left // per_epoch)))


def stop_code(train_cfg: TrainConfig, epoch: int, planned: int, bad_epochs: int, time_left: float,
              last_epoch_seconds: float) -> int:
    """0 to go on after `epoch`, else the STOP_KINDS code of the reason to stop."""
    if epoch >= train_cfg.epochs:
        return 1
    # Stop early rather than start an epoch that cannot finish within the budget.
    if train_cfg.time_budget_min > 0 and (time_left <= 0 or epoch >= planned or time_left < 0.5 * last_epoch_seconds):
        return 2
    if train_cfg.early_stop_patience > 0 and bad_epochs >= train_cfg.early_stop_patience:
        return 3
    return 0


def stop_message(kind: Optional[str], train_cfg: TrainConfig) -> str:
    return {"epochs": "finished the configured epochs",
            "time_budget": f"time budget of {train_cfg.time_budget_min} min spent",
            "early_stop": f"early stopping: no {train_cfg.monitor} improvement for "
                          f"{train_cfg.early_stop_patience} epochs"}.get(kind, "stopped")
