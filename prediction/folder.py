"""Prediction on a folder of unlabelled images (`test.py --input`): a mask PNG per image and one CSV of classes
and probabilities.

Every readable image is predicted; an unreadable one (empty, truncated, not an image, below the minimum size)
is listed with its reason in the CSV and on the console, and the caller exits non-zero. Masks are made at each
image's own size from bilinearly upsampled logits (`datasets.geometry.logits_to_original` with the image's
`Placement`: stretched, letterboxed or cropped to the head as in training, `data.preprocess.resize`), then
thresholded on the logits as test.py scores them (sigmoid(x) >= t <=> x >= log(t / (1 - t))).
`predict_batch` does this for several images at once with an eager model or any `model.runtime` predictor
(`predict_image`: one image) (the folder loop and the web demo call it; the predictor splits a batch into chunks
that never cost more per image than batch 1). On a CPU it predicts with the ONNX Runtime export of the checkpoint
by default (eval.predict_runtime: auto; 2.5-3x faster than eager PyTorch with identical validation figures,
docs/runtime.md); `--runtime torch` predicts with the eager model.
"""
from __future__ import annotations

import csv
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TypeVar, Union

import torch.nn as nn

import numpy as np
import torch

from datasets import CLASS_NAMES, DataError
from datasets.geometry import Placement, logits_to_original
from datasets.index import IMAGE_SUFFIXES
from evaluation.inference import predict
from evaluation.metrics import logit_of
from model import model_tasks
from utils.runtime import select_device

MASK_SUFFIX = "_mask.png"
NO_HEAD_PLACEMENT = "letterbox (no head found)"  # the placement column of a head run's fallback
T, R = TypeVar("T"), TypeVar("R")


def fresh_output_dir(checkpoint: Path, input_dir: Path) -> Path:
    """`<run>/predictions/<input folder>-<time>`: a folder of its own for each prediction run."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(checkpoint).resolve().parent / "predictions" / f"{input_dir.resolve().name}-{stamp}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def mask_name(file_name: str) -> str:
    """The mask file of an input image: `<stem>_mask.png`."""
    return f"{Path(file_name).stem}{MASK_SUFFIX}"


def remove_stale_masks(mask_dir: Path, written: set[str]) -> int:
    """Delete `*_mask.png` files in `mask_dir` that this run did not write (left by an earlier run)."""
    stale = [p for p in mask_dir.glob(f"*{MASK_SUFFIX}") if p.name not in written]
    for path in stale:
        path.unlink()
    return len(stale)


@dataclass
class ImagePrediction:
    """One image's prediction; its tumour logits at its own size are mapped back from the model's on first use
    (`tumour_logits`, `mask`), so a caller can do that where it uses them (the folder loop: in its threads)."""

    probabilities: np.ndarray  # (num_classes,) softmax of the class logits
    seg_logits: Optional[torch.Tensor]  # (1, 1, S, S) CPU segmentation logits at the model's size; None: no seg
    threshold: float  # the segmentation threshold `mask` applies
    model_input: torch.Tensor  # the normalised (C, S, S) input the model saw (for Grad-CAM)
    size: tuple[int, int]  # the image's own (width, height)
    seconds: float  # the model's time for this image (forward pass, TTA included, and the softmax)
    placement: Placement  # where the image sat on the model's input: what maps the mask and Grad-CAM back
    _own_size_logits: Optional[np.ndarray] = field(default=None, init=False, repr=False, compare=False)

    @property
    def tumour_logits(self) -> Optional[np.ndarray]:
        """(height, width) float32 segmentation logits at the image's own size (bilinear through its placement,
        `logits_to_original`); None for classification-only models. Computed once."""
        if self._own_size_logits is None and self.seg_logits is not None:
            logits = logits_to_original(self.seg_logits, self.placement.original_hw, self.placement)
            self._own_size_logits = logits[0, 0].numpy().astype(np.float32, copy=False)
        return self._own_size_logits

    @property
    def tumour_probability(self) -> Optional[np.ndarray]:
        """(height, width) float32 sigmoid of the tumour logits; None for classification-only models."""
        logits = self.tumour_logits
        return None if logits is None else torch.sigmoid(torch.from_numpy(logits)).numpy()

    @property
    def class_index(self) -> Optional[int]:
        return None if self.probabilities is None else int(self.probabilities.argmax())

    @property
    def predicted_class(self) -> Optional[str]:
        return None if self.probabilities is None else CLASS_NAMES[self.class_index]

    @property
    def placement_label(self) -> str:
        """How the image was placed: stretch, letterbox, head, or `letterbox (no head found)` for a head fallback."""
        return NO_HEAD_PLACEMENT if self.placement.fallback else self.placement.mode

    def mask(self, threshold: Optional[float] = None) -> Optional[np.ndarray]:
        """The 0/255 uint8 tumour mask at the image's own size at `threshold` (default: the prediction's own)."""
        import cv2

        logits = self.tumour_logits
        if logits is None:
            return None
        cut = logit_of(self.threshold if threshold is None else threshold)
        if math.isinf(cut):  # threshold 0 or 1: every pixel or none
            return np.full(logits.shape, 255 if cut < 0 else 0, dtype=np.uint8)
        return cv2.compare(logits, cut, cv2.CMP_GE)  # 255 where logits >= cut, else 0, in one pass


def predict_image(model: nn.Module, cfg, image: Union[str, Path, np.ndarray], threshold: Optional[float] = None,
                  tta: bool = False) -> ImagePrediction:
    """Classify and segment one image file (or its decoded uint8 greyscale array) with the preprocessing of
    training (`prepare_for_inference`); the mask is mapped back to the image's own size through its placement.

    `cfg` is the checkpoint's config; `threshold` defaults to `cfg.eval.threshold`. Raises `DataError` for an
    unreadable image or an array that is not a 2-D uint8 greyscale image.
    """
    result = predict_batch(model, cfg, [image], threshold, tta)[0]
    if isinstance(result, DataError):
        raise result
    return result


def model_device(model: nn.Module) -> torch.device:
    """Where `model` runs: a predictor's `device` (exported runtimes have no parameters), else its parameters'."""
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def _prepared(image: Union[str, Path, np.ndarray], data_cfg) -> tuple[torch.Tensor, Placement]:
    from datasets.transforms import prepare_for_inference

    if isinstance(image, np.ndarray) and (image.ndim != 2 or image.dtype != np.uint8):
        raise DataError(f"predict_image takes a decoded uint8 greyscale (H, W) array, got {image.dtype} "
                        f"{tuple(image.shape)}: decode files with datasets.decode.read_grey")
    return prepare_for_inference(image, data_cfg)


def load_images(images: Sequence[Union[str, Path, np.ndarray]], data_cfg
                ) -> list[Union[tuple[torch.Tensor, Placement], DataError]]:
    """Each image decoded and placed as in training (its model input and Placement), or the DataError that made
    it unreadable."""
    def one(image: Union[str, Path, np.ndarray]) -> Union[tuple[torch.Tensor, Placement], DataError]:
        try:
            return _prepared(image, data_cfg)
        except DataError as exc:
            return exc

    return [one(image) for image in images]


@torch.no_grad()
def predict_loaded(model: nn.Module, cfg, loaded: Sequence[Union[tuple[torch.Tensor, Placement], DataError]],
                   threshold: Optional[float] = None, tta: bool = False) -> list[Union[ImagePrediction, DataError]]:
    """`load_images`' output through one call of `model` (an eager model or a `model.runtime` predictor, which
    splits the batch under its pixel budget): per image its ImagePrediction, or its DataError. `seconds` is the
    image's share of the batch's model time."""
    readable = [item for item in loaded if not isinstance(item, DataError)]
    if not readable:
        return list(loaded)
    start = time.perf_counter()
    outputs = predict(model, torch.stack([item[0] for item in readable]).to(model_device(model)), tta=tta)
    # .cpu() waits for the device; a segmentation-only run has no class output, a classification-only one no seg
    probs = torch.softmax(outputs["cls"].float(), 1).cpu().numpy() if "cls" in outputs else None
    seg = outputs["seg"].float().cpu() if "seg" in outputs else None
    seconds = (time.perf_counter() - start) / len(readable)
    cut = cfg.eval.threshold if threshold is None else float(threshold)
    done = iter(ImagePrediction(probabilities=None if probs is None else probs[i],
                                seg_logits=None if seg is None else seg[i:i + 1], threshold=cut,
                                model_input=image, size=(placement.original_hw[1], placement.original_hw[0]),
                                seconds=seconds, placement=placement)
                for i, (image, placement) in enumerate(readable))
    return [item if isinstance(item, DataError) else next(done) for item in loaded]


def predict_batch(model: nn.Module, cfg, images: Sequence[Union[str, Path, np.ndarray]],
                  threshold: Optional[float] = None, tta: bool = False) -> list[Union[ImagePrediction, DataError]]:
    """Predict several images in one call of `model`: `load_images` then `predict_loaded`, in this thread."""
    return predict_loaded(model, cfg, load_images(images, cfg.data), threshold, tta)


def _in_order(work: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """`work(item)` for each item, yielded in order; with `workers` > 0, up to that many items run at once in
    threads (and at most one more result waits), else one after another in this thread."""
    if workers == 0:
        yield from map(work, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="predict")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # an error (a full disk, Ctrl-C) stops the batches not yet started
        pool.shutdown(cancel_futures=True)


def _write_mask(path: Path, prediction: ImagePrediction) -> int:
    """Map one prediction's mask back to its image's size and write it as a 0/255 PNG; its tumour pixel count."""
    import cv2

    mask = prediction.mask()
    # no PNG row filters: a 0/255 mask compresses as well without them (smaller files, measured) and libpng's
    # default tries five filters per row, a fifth of the encoding time
    if not cv2.imwrite(str(path), mask, [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]):
        raise DataError(f"could not write the mask '{path}' (disk full or folder not writable?)")
    return cv2.countNonZero(mask)


def _predict_files(model: nn.Module, cfg, paths: list[Path], columns: list[str], mask_dir: Path,
                   threshold: Optional[float], tta: bool) -> list[dict]:
    """One batch of files predicted in one call of the model, its masks mapped back and written; its CSV rows."""
    rows = []
    for path, result in zip(paths, predict_batch(model, cfg, paths, threshold, tta)):
        row = dict.fromkeys(columns, "")
        row["file"] = path.name
        rows.append(row)
        if isinstance(result, DataError):
            row.update(status="failed", error=str(result))
            continue
        row["status"] = "ok"
        if "placement" in row:
            row["placement"] = result.placement_label
        if "predicted_class" in row:
            row["predicted_class"] = result.predicted_class
            row.update({f"p_{name}": round(float(p), 6) for name, p in zip(CLASS_NAMES, result.probabilities)})
        if "tumour_pixels" in row:
            row["tumour_pixels"] = _write_mask(mask_dir / mask_name(path.name), result)
    return rows


def predict_folder(checkpoint: Path, input_dir: Path, out_dir: Optional[Path], device_name: str = "auto",
                   threshold: Optional[float] = None, tta: bool = False, use_ema: bool = True,
                   runtime: Optional[str] = None, precision: Optional[str] = None,
                   batch_size: Optional[int] = None, workers: Optional[int] = None) -> list[str]:
    """Classify and segment every image in `input_dir`; write `<stem>_mask.png` files and `predictions.csv`.

    `runtime` / `precision`: the inference runtime (None: eval.predict_runtime / eval.runtime_precision of the
    run: onnxruntime fp32 on a CPU, eager torch on a GPU); `batch_size` images are read and predicted per call
    (default: eval.batch_size). `workers` batches are in flight at once, each in a thread of its own: decoded,
    predicted, masks mapped back and written (default: the CPU count, at most 4; 0: one batch after another in
    this thread); ONNX Runtime then runs each call on its share of the threads. The files written are the same
    either way.
    Returns the names of the files that could not be predicted (also in the CSV with their reason).
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DataError(f"--input '{input_dir}' is not a folder of images")
    files = sorted(p for p in input_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"--input '{input_dir}' holds no {'/'.join(sorted(IMAGE_SUFFIXES))} images")
    from evaluation.predictor import prediction_predictor, prediction_runtime, runtime_label
    from utils.checkpoint import config_of, read_checkpoint

    device = select_device(device_name, key="--device")
    loaded = read_checkpoint(checkpoint)
    cfg = config_of(loaded, checkpoint)
    runtime, precision, automatic = prediction_runtime(cfg.eval, runtime, precision, device)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    # the batches in flight share the cores: ONNX Runtime gets its share of torch's thread count in each
    threads = max(1, torch.get_num_threads() // max(1, workers))
    model = prediction_predictor(checkpoint, runtime, precision, automatic, device, use_ema, loaded, threads)
    del loaded  # the weights and optimizer state are not needed while predicting
    print(runtime_label(model))
    batch_size = batch_size or cfg.eval.batch_size
    out_dir = Path(out_dir) if out_dir else fresh_output_dir(checkpoint, input_dir)
    has_seg = "seg" in model_tasks(model)  # classification-only models write the CSV alone
    has_cls = "cls" in model_tasks(model)  # segmentation-only runs write no class columns
    mask_dir = out_dir / "masks"
    (mask_dir if has_seg else out_dir).mkdir(parents=True, exist_ok=True)
    head = cfg.data.preprocess.resize == "head"  # head runs say per image whether the head was found
    columns = ["file", *(["predicted_class"] if has_cls else []), *(["tumour_pixels"] if has_seg else []),
               *(f"p_{n}" for n in (CLASS_NAMES if has_cls else [])), *(["placement"] if head else []),
               "status", "error"]
    batches = [files[start:start + batch_size] for start in range(0, len(files), batch_size)]
    rows, failed, written, fallbacks = [], [], set(), []

    def predict_and_write(batch: list[Path]) -> list[dict]:
        return _predict_files(model, cfg, batch, columns, mask_dir, threshold, tta)

    for row in (row for batch_rows in _in_order(predict_and_write, batches, workers) for row in batch_rows):
        rows.append(row)
        if row["status"] == "failed":
            failed.append(row["file"])
            print(f"failed: {row['file']}: {row['error']}")
            continue
        if has_seg:
            written.add(mask_name(row["file"]))
        if head and row["placement"] == NO_HEAD_PLACEMENT:
            fallbacks.append(row["file"])
    stale = remove_stale_masks(mask_dir, written) if has_seg else 0
    with open(out_dir / "predictions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    masks = f"masks in {mask_dir}, " if has_seg else ""
    print(f"{len(rows) - len(failed)} of {len(rows)} images predicted: {masks}classes and probabilities in "
          f"{out_dir / 'predictions.csv'}")
    if fallbacks:
        print(f"note: head not found in {len(fallbacks)} of {len(rows) - len(failed)} images "
              f"({', '.join(fallbacks[:3])}{', ...' if len(fallbacks) > 3 else ''}); they were letterboxed "
              "instead (predictions.csv: placement)")
    if stale:
        print(f"removed {stale} mask(s) of an earlier run from {mask_dir}")
    if failed:
        print(f"{len(failed)} file(s) could not be predicted (listed above and in predictions.csv)")
    return failed
