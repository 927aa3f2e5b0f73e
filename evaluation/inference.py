"""The inference loop shared by training-time validation and test.py: batches to the device, eval-mode
forward (optionally with flip test-time augmentation), metrics accumulated on the device."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from evaluation.metrics import MultiTaskMetrics
from model import model_tasks
from utils.checkpoint import unwrap_model
from utils.runtime import autocast


def eval_loader(cfg, dataset, batch_size: Optional[int] = None, num_workers: Optional[int] = None) -> DataLoader:
    """The evaluation DataLoader of test.py and the shift benchmark: in order, `eval.batch_size` and
    `data.num_workers` unless given."""
    return DataLoader(dataset, batch_size=batch_size or cfg.eval.batch_size, shuffle=False,
                      num_workers=cfg.data.num_workers if num_workers is None else num_workers)


def move_batch(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """Tensors of a batch to `device` (non-blocking from pinned memory); ids stay a list."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, non_blocking=True)
            if key == "image" and channels_last:
                value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def run_outputs(model: nn.Module, outputs: dict) -> dict:
    """The outputs of the tasks the run trains (`model.tasks`, set by `model.loading.assign_tasks`): a
    segmentation-only run of a two-head model drops its untrained `cls` logits, so no table shows them."""
    tasks = model_tasks(model)
    return {key: value for key, value in outputs.items() if key in tasks or key not in ("cls", "seg")}


def predict(model: nn.Module, images: torch.Tensor, tta: bool = False) -> dict:
    """Eval-mode forward; with `tta`, average the probabilities of the image and its horizontal flip.

    The averaged probabilities are returned as logits again (log-softmax for `cls`, logit for `seg`), so every
    consumer of the output contract works unchanged.
    """
    outputs = run_outputs(model, model(images))
    if not tta:
        return outputs
    flipped = model(torch.flip(images, dims=[3]))
    averaged = {}
    if "cls" in outputs:  # segmentation-only runs have no class output
        cls_prob = (F.softmax(outputs["cls"].float(), 1) + F.softmax(flipped["cls"].float(), 1)) / 2
        averaged["cls"] = torch.log(cls_prob.clamp_min(1e-12))
    if "seg" in outputs:  # classification-only models have no mask
        seg_prob = (torch.sigmoid(outputs["seg"].float()) +
                    torch.sigmoid(torch.flip(flipped["seg"].float(), dims=[3]))) / 2
        averaged["seg"] = torch.logit(seg_prob, eps=1e-6)
    return averaged


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, metrics: MultiTaskMetrics, device: torch.device,
             loss_fn: Optional[nn.Module] = None, amp_dtype: Optional[torch.dtype] = None, tta: bool = False,
             channels_last: bool = False, show_progress: bool = True, desc: str = "eval",
             distributed: bool = False, on_batch: Optional[Callable[[dict, dict], None]] = None) -> dict:
    """Run the model over `loader` and return the metric dict (plus `loss` when a loss function is given).

    `on_batch(outputs, batch)`, when given, sees every batch's (float) outputs after the metrics did, e.g. to
    keep per-image records that the counts do not hold (native-resolution scoring in test.py).

    In a distributed run each rank sees its own shard and counts are summed across ranks before `compute()`.
    """
    model.eval()
    metrics.reset()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not show_progress,
                      mininterval=1.0):
        batch = move_batch(batch, device, channels_last)
        with autocast(device, amp_dtype):
            outputs = predict(model, batch["image"], tta=tta)
        outputs = {key: value.float() for key, value in outputs.items() if torch.is_tensor(value)}
        if loss_fn is not None:
            total, _ = loss_fn(outputs, batch)
            loss_sum += total.double() * batch["label"].shape[0]
        count += batch["label"].shape[0]
        metrics.update(outputs, batch)
        if on_batch is not None:
            on_batch(outputs, batch)
    if distributed:
        import torch.distributed as dist

        metrics.sync()
        dist.all_reduce(loss_sum)
        dist.all_reduce(count)
    results = metrics.compute()
    if loss_fn is not None:
        results["loss"] = float(loss_sum / count.clamp_min(1))
    # The mean of the tasks the model has: accuracy and Dice, or accuracy alone for a classification-only model.
    present = [results[key] for key in ("accuracy", "dice") if key in results]
    results["combined"] = sum(present) / len(present)
    return results


@torch.no_grad()
def collect_outputs(model: nn.Module, loader: DataLoader, device: torch.device, tta: bool = False,
                    amp_dtype: Optional[torch.dtype] = None, show_progress: bool = True, desc: str = "eval",
                    keep_cls: bool = True, on_seg: Optional[Callable[[torch.Tensor, dict], None]] = None
                    ) -> tuple[Optional[torch.Tensor], torch.Tensor, list[str]]:
    """(class logits (N, K) on the CPU, or None without a class output or `keep_cls`; labels (N,); ids) over
    `loader`, in order, without scoring anything; `on_seg(seg_logits, batch)` sees each batch's float
    segmentation logits (e.g. to count pixels at native size)."""
    model.eval()
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    ids: list[str] = []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not show_progress,
                      mininterval=1.0):
        batch = move_batch(batch, device)
        with autocast(device, amp_dtype):
            outputs = predict(model, batch["image"], tta=tta)
        if "seg" in outputs and on_seg is not None:
            on_seg(outputs["seg"].float(), batch)
        if "cls" in outputs and keep_cls:
            logits.append(outputs["cls"].float().cpu())
        labels.append(batch["label"].cpu())
        ids += list(batch["id"])
    return (torch.cat(logits) if logits else None), torch.cat(labels), ids
