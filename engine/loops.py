"""One training epoch: the step loop (forward, loss, backward, optimiser step, EMA), with loss terms summed on
the device and read back only at logging steps."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from evaluation.inference import move_batch
from utils.runtime import autocast


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochResult:
    terms: dict  # mean of every loss term over the epoch
    accuracy: Optional[float]  # training classification accuracy (on augmented images); None without that task
    images: int
    seconds: float
    data_seconds: float  # time spent waiting for the loader

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class TrainContext:
    """Everything the step loop needs besides the model and the data."""

    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: object  # engine.optim.LRSchedule
    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    grad_clip: float = 0.0
    grad_accum_steps: int = 1
    channels_last: bool = False
    ema: Optional[nn.Module] = None
    log_every: int = 20
    show_progress: bool = True
    on_log: Optional[Callable[[int, dict], None]] = None  # (global step, {name: value}) for TensorBoard
    global_step: int = 0
    step: int = 0  # step within the current epoch (for "interrupted at epoch E step S")
    extra: dict = field(default_factory=dict)


def train_one_epoch(model: nn.Module, loader: DataLoader, ctx: TrainContext, epoch: int,
                    should_stop: Optional[Callable[[], bool]] = None) -> EpochResult:
    """One pass over `loader`. Loss terms are summed on the device and read back only at log steps.

    `should_stop` (e.g. "the time budget is spent", a collective under DDP) is asked every `log_every` steps,
    so that every rank asks at the same step and no step pays for an extra synchronisation."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=ctx.device, dtype=torch.long)
    images = 0
    data_time = 0.0
    start = tick = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, dynamic_ncols=True, disable=not ctx.show_progress,
               mininterval=1.0)
    ctx.optimizer.zero_grad(set_to_none=True)
    steps_in_epoch = len(loader)
    for step, batch in enumerate(bar, start=1):
        data_time += time.perf_counter() - tick
        ctx.step = step
        batch = move_batch(batch, ctx.device, ctx.channels_last)
        accumulate = step % ctx.grad_accum_steps != 0 and step != steps_in_epoch
        sync_ctx = model.no_sync() if accumulate and hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync_ctx:
            with autocast(ctx.device, ctx.amp_dtype):
                outputs = model(batch["image"])
            total, terms = ctx.loss_fn(outputs, batch)
            scaled = total / ctx.grad_accum_steps
            if ctx.scaler is not None:
                ctx.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        if not accumulate:
            _optimizer_step(model, ctx)

        batch_size = batch["label"].shape[0]
        images += batch_size
        for name, value in terms.items():
            value = value.detach().float() * batch_size
            sums[name] = sums[name] + value if name in sums else value
        if "cls" in terms:  # a run that trains classification (untrained heads are not scored)
            correct += (outputs["cls"].detach().argmax(1) == batch["label"]).sum()

        if step % ctx.log_every == 0 or step == steps_in_epoch:
            loss_now = float(total.detach())
            if not math.isfinite(loss_now):
                raise NonFiniteLossError(
                    f"the training loss became {loss_now} at epoch {epoch}, step {step}; terms: "
                    + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
                    + ". Lower optim.lr, enable train.grad_clip, or check the data; the last good checkpoint is kept.")
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_now:.4f}", lr=f"{ctx.schedule.lr:.2e}", img_s=f"{images / elapsed:.1f}")
            if ctx.on_log is not None:
                ctx.on_log(ctx.global_step, {f"train_step/{k}": float(v) for k, v in terms.items()}
                           | {"train_step/lr": ctx.schedule.lr})
        if should_stop is not None and step % ctx.log_every == 0 and step != steps_in_epoch and should_stop():
            break  # e.g. the wall-clock budget is spent: end the epoch early, the trainer stops cleanly
        tick = time.perf_counter()
    bar.close()
    seconds = time.perf_counter() - start
    means = {name: float(value) / max(images, 1) for name, value in sums.items()}
    accuracy = float(correct) / max(images, 1) if "cls" in sums else None
    return EpochResult(means, accuracy, images, seconds, data_time)


def _optimizer_step(model: nn.Module, ctx: TrainContext) -> None:
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)
    if ctx.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.schedule.step_batch()
    if ctx.ema is not None:
        ctx.ema.update_parameters(model)
    ctx.global_step += 1
