"""The inference loop shared by training-time validation and test.py: batches to the device, eval-mode
forward (optionally with flip test-time augmentation), metrics accumulated on the device."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from evaluation.metrics import MultiTaskMetrics
from model import model_tasks
from utils.runtime import autocast


def eval_loader(cfg, dataset, batch_size: Optional[int] = None, num_workers: Optional[int] = None) -> DataLoader:
    """The evaluation DataLoader of test.py and the shift benchmark: in order, `eval.batch_size` and
    `data.loader.num_workers` unless given."""
    return DataLoader(dataset, batch_size=batch_size or cfg.eval.batch_size, shuffle=False,
                      num_workers=cfg.data.loader.num_workers if num_workers is None else num_workers)


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
def inference_batches(model: nn.Module, loader: DataLoader, device: torch.device, tta: bool = False,
                      amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
                      show_progress: bool = True, desc: str = "eval") -> Iterator[tuple[dict, dict]]:
    """The one inference loop: (float outputs of the tasks the run trains, batch on `device`) per batch, in order.

    Training-time validation (`evaluate`), test.py (`evaluation.pipeline`) and the shift benchmark all read the
    model's predictions through it."""
    model.eval()
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not show_progress,
                      mininterval=1.0):
        batch = move_batch(batch, device, channels_last)
        with autocast(device, amp_dtype):
            outputs = predict(model, batch["image"], tta=tta)
        yield {key: value.float() for key, value in outputs.items() if torch.is_tensor(value)}, batch


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, metrics: MultiTaskMetrics, device: torch.device,
             loss_fn: Optional[nn.Module] = None, amp_dtype: Optional[torch.dtype] = None, tta: bool = False,
             channels_last: bool = False, show_progress: bool = True, desc: str = "eval",
             distributed: bool = False) -> dict:
    """Run the model over `loader` and return the metric dict (plus `loss` when a loss function is given).

    In a distributed run each rank sees its own shard and counts are summed across ranks before `compute()`.
    """
    metrics.reset()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for outputs, batch in inference_batches(model, loader, device, tta, amp_dtype, channels_last, show_progress, desc):
        if loss_fn is not None:
            total, _ = loss_fn(outputs, batch)
            loss_sum += total.double() * batch["label"].shape[0]
        count += batch["label"].shape[0]
        metrics.update(outputs, batch)
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
