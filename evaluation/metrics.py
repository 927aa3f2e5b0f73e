"""Classification and segmentation metrics, accumulated as counts on the device and computed once.

Definitions (the same text is `METRIC_DEFINITIONS_MD`, reproduced in docs/metrics.md):

Classification (4 classes, label order glioma, meningioma, no_tumor, pituitary):
accuracy; precision, recall and F1 per class, and their macro (unweighted mean over the classes present) and weighted
(mean weighted by each class's true count) averages; the confusion matrix (rows: true class, columns:
predicted class). A ratio whose denominator is 0 counts as 0 (scikit-learn's ``zero_division=0``).

Segmentation (binary tumour mask; a pixel is predicted tumour when sigmoid(logit) >= threshold, 0.5 unless
tuned): only images with an annotation take part (``has_mask``; every BRISC image has one, no-tumour images an
empty one). With TP, FP, FN, TN pixel counts:

- ``dice`` / ``iou``: per image 2TP / (2TP + FP + FN) and TP / (TP + FP + FN), averaged over the images that
  have a tumour in the ground truth (the usual "mean Dice / mIoU"; the primary figures).
- ``dice_global`` / ``iou_global``: the same ratios from TP, FP, FN summed over the whole dataset.
- ``dice_2class`` / ``miou_2class``: the mean over {background, tumour} of the global Dice / IoU, background
  Dice = 2TN / (2TN + FP + FN), background IoU = TN / (TN + FP + FN): the convention of the published
  EfficientMTNet table; it reads higher than tumour-only Dice.
- ``dice_all_images`` / ``iou_all_images``: per-image Dice / IoU averaged over all annotated images, an image
  whose ground truth and prediction are both empty counting as 1 and an empty ground truth with any predicted
  pixel as 0: the convention of other BRISC 2025 reports.
- ``pixel_accuracy`` (TP + TN) / all pixels; ``sensitivity`` TP / (TP + FN); ``specificity`` TN / (TN + FP),
  all from dataset-wide pixel counts.
- ``empty_fp_rate``: the share of images with an empty ground truth (no tumour) where at least one tumour pixel
  is predicted. Empty/empty images are perfect matches and are reported here, not in ``dice`` / ``iou``.

A classification-only model (no ``seg`` in its output) gets the classification figures alone: no segmentation
key is computed (never a zero standing for "not measured"); its per-image records have ``None`` for the mask
fields. Mixing batches with and without ``seg`` in one evaluation is an error.

Counts are accumulated on the tensors' device with no host synchronisation per batch; ``sync()`` sums them
across torch.distributed ranks (and ``merge()`` across objects), so a sharded evaluation gives exactly the
figures of a single process.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

METRIC_DEFINITIONS_MD = """\
| Key | Definition | Averaged over |
|---|---|---|
| `accuracy` | correct class predictions / images | all images |
| `precision_<class>`, `recall_<class>`, `f1_<class>` | TP / (TP + FP), TP / (TP + FN), 2TP / (2TP + FP + FN) for that class | all images |
| `precision_macro`, `recall_macro`, `f1_macro` | unweighted mean of the per-class values | the classes present in the truth or the predictions (all 4 on a whole split; scikit-learn's default) |
| `precision_weighted`, `recall_weighted`, `f1_weighted` | per-class values weighted by each class's true count | the 4 classes |
| `confusion_matrix` | rows: true class, columns: predicted class (glioma, meningioma, no_tumor, pituitary) | all images |
| `dice`, `iou` | per-image 2TP / (2TP + FP + FN), TP / (TP + FP + FN) of the tumour mask (primary figures) | images with a tumour in the ground truth |
| `dice_global`, `iou_global` | the same ratios from TP, FP, FN summed over the dataset | all pixels of annotated images |
| `dice_2class`, `miou_2class` | mean over {background, tumour} of the global Dice / IoU (background Dice = 2TN / (2TN + FP + FN), IoU = TN / (TN + FP + FN)); the published EfficientMTNet table's convention | all pixels of annotated images |
| `dice_all_images`, `iou_all_images` | per-image Dice / IoU with empty ground truth and empty prediction = 1, empty ground truth with a false positive = 0; the convention of other BRISC 2025 reports | all annotated images |
| `pixel_accuracy` | (TP + TN) / pixels | all pixels of annotated images |
| `sensitivity`, `specificity` | TP / (TP + FN), TN / (TN + FP) | all pixels of annotated images |
| `empty_fp_rate` | images with at least one predicted tumour pixel / images | images with an empty ground truth (no tumour) |

A pixel is predicted tumour when sigmoid(logit) >= the threshold (0.5 unless tuned). Images without an
annotation (`has_mask` false) take no part in the segmentation figures; every BRISC 2025 image has one
(no-tumour images an empty mask). A ratio whose denominator is 0 counts as 0 (scikit-learn's
`zero_division=0`). Image counts: `num_images`, `num_seg_images` (annotated), `num_tumour_images`,
`num_empty_images`.
"""

# Index of each pixel count and each per-image sum in the state tensors.
_TP, _FP, _FN, _TN = range(4)
_SEG, _TUMOUR, _EMPTY, _EMPTY_FP = range(4)
_DICE_TUMOUR, _IOU_TUMOUR, _DICE_ALL, _IOU_ALL = range(4)


def _ratio(num: float, den: float) -> float:
    """num / den, or 0 when den is 0 (scikit-learn's zero_division=0)."""
    return num / den if den > 0 else 0.0


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def logit_of(threshold: float) -> float:
    """The logit cut of a probability threshold: sigmoid(x) >= t  <=>  x >= log(t / (1 - t)), so masks are made by
    comparing logits, with no sigmoid (t <= 0: every pixel, t >= 1: none)."""
    if threshold <= 0.0:
        return -math.inf
    if threshold >= 1.0:
        return math.inf
    return math.log(threshold / (1.0 - threshold))


class MultiTaskMetrics:
    """Accumulates classification and segmentation counts over batches; `compute()` gives the figures.

    `update(outputs, batch)` takes the model's output dict (``cls`` logits (B, K), ``seg`` logits (B, 1, H, W)
    at the mask's size) and the batch (``label``, ``mask``, optional ``has_mask`` and ``id``). With
    `keep_per_image`, a record per image (id, label, prediction, probability, Dice, IoU, pixel counts) is also
    kept on the CPU for best/worst-case figures (one device-to-host copy per batch).
    """

    def __init__(self, num_classes: int, class_names: Optional[Sequence[str]] = None, threshold: float = 0.5,
                 keep_per_image: bool = False) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if class_names is None:
            class_names = [str(index) for index in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names {list(class_names)} for {num_classes} classes")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"segmentation threshold must be in (0, 1), got {threshold}")
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.threshold = float(threshold)
        self._logit_threshold = logit_of(threshold)
        self.keep_per_image = keep_per_image
        self.reset()

    # ------------------------------------------------------------------------------------------ state
    def reset(self) -> None:
        self._state: Optional[dict[str, torch.Tensor]] = None
        self._records: list[dict] = []
        self._synced = False
        self._has_seg: Optional[bool] = None  # set by the first update: does the model predict a mask?
        self._has_cls: Optional[bool] = None  # ... and a class (False: a segmentation-only run)

    def _new_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        k = self.num_classes
        return {
            "confusion": torch.zeros(k, k, dtype=torch.long, device=device),
            "pixels": torch.zeros(4, dtype=torch.long, device=device),  # TP, FP, FN, TN
            "images": torch.zeros(4, dtype=torch.long, device=device),  # annotated, tumour, empty, empty with FP
            "overlap": torch.zeros(4, dtype=_sum_dtype(device), device=device),  # sums of per-image Dice / IoU
            "seen": torch.zeros(1, dtype=torch.long, device=device),  # images evaluated (also without a class output)
        }

    def state_tensors(self, device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
        """The count tensors themselves (created on `device`, or the CPU, if nothing was accumulated yet).

        Summing them element-wise across objects or ranks merges the evaluations they describe.
        """
        if self._state is None:
            self._state = self._new_state(torch.device("cpu") if device is None else torch.device(device))
        elif device is not None and self._state["pixels"].device != torch.device(device):
            self._state = {name: tensor.to(device) for name, tensor in self._state.items()}
        return self._state

    # ------------------------------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, outputs: dict, batch: dict) -> None:
        """Add one batch; everything stays on the device of ``outputs['cls']``."""
        if self._synced:
            raise RuntimeError("these metrics were already synchronised across ranks; call reset() before "
                               "accumulating a new evaluation")
        has_seg, has_cls = "seg" in outputs, "cls" in outputs
        if not (has_seg or has_cls):
            raise ValueError("outputs have neither 'cls' nor 'seg'; nothing to score")
        if (self._has_seg is not None and has_seg != self._has_seg) or (
                self._has_cls is not None and has_cls != self._has_cls):
            raise ValueError("some batches of this evaluation have outputs['seg'] (or ['cls']) and others not; "
                             "one model predicts each task for every batch or for none")
        self._has_seg, self._has_cls = has_seg, has_cls
        device = (outputs["cls"] if has_cls else outputs["seg"]).device
        state = self.state_tensors(device)
        labels = batch["label"].to(device=device, dtype=torch.long)
        state["seen"] += labels.shape[0]
        logits = None
        if has_cls:
            logits = outputs["cls"].detach()
            preds = logits.argmax(1)
            k = self.num_classes
            if logits.shape[1] != k:
                raise ValueError(f"outputs['cls'] has {logits.shape[1]} classes, the metrics were built for {k}")
            # index_add_ rather than bincount: bincount reads the maximum back to the host on CUDA.
            state["confusion"].view(-1).index_add_(0, labels * k + preds, torch.ones_like(labels))

        if not has_seg:
            if self.keep_per_image:
                self._keep_records(batch, labels, logits, None)
            return
        per_image = self._segmentation_counts(outputs["seg"].detach(), batch, device)
        tp, fp, fn, tn = (per_image[name] for name in ("tp", "fp", "fn", "tn"))
        annotated = per_image["annotated"]
        state["pixels"] += (torch.stack([tp, fp, fn, tn], 1) * annotated.long().unsqueeze(1)).sum(0)
        tumour = annotated & (tp + fn > 0)
        empty = annotated & (tp + fn == 0)
        empty_fp = empty & (fp > 0)
        state["images"] += torch.stack([annotated, tumour, empty, empty_fp]).long().sum(1)
        dice, iou = per_image["dice"], per_image["iou"]
        state["overlap"] += torch.stack([
            (dice * tumour).sum(), (iou * tumour).sum(), (dice * annotated).sum(), (iou * annotated).sum()
        ]).to(state["overlap"].dtype)

        if self.keep_per_image:
            self._keep_records(batch, labels, logits, per_image)

    def _segmentation_counts(self, seg: torch.Tensor, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        mask = batch["mask"].to(device)
        if seg.shape[-2:] != mask.shape[-2:] or seg.shape[0] != mask.shape[0]:
            raise ValueError(f"outputs['seg'] has shape {tuple(seg.shape)} but batch['mask'] has "
                             f"{tuple(mask.shape)}; segmentation metrics need logits at the mask's size")
        pred = (seg.float() >= self._logit_threshold).flatten(1)
        truth = (mask >= 0.5).flatten(1)
        tp = (pred & truth).sum(1)
        pred_pixels = pred.sum(1)
        true_pixels = truth.sum(1)
        fp = pred_pixels - tp
        fn = true_pixels - tp
        tn = pred.shape[1] - tp - fp - fn
        has_mask = batch.get("has_mask")
        annotated = (torch.ones_like(tp, dtype=torch.bool) if has_mask is None
                     else has_mask.to(device=device, dtype=torch.bool))
        # Per-image ratios; an empty ground truth with an empty prediction is a perfect match (1).
        dtype = _sum_dtype(device)
        union = (tp + fp + fn).to(dtype)
        dice = torch.where(union > 0, 2 * tp.to(dtype) / (union + tp.to(dtype)).clamp_min(1), torch.ones_like(union))
        iou = torch.where(union > 0, tp.to(dtype) / union.clamp_min(1), torch.ones_like(union))
        return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "annotated": annotated, "dice": dice, "iou": iou}

    def _keep_records(self, batch: dict, labels: torch.Tensor, logits: Optional[torch.Tensor],
                      per_image: Optional[dict[str, torch.Tensor]]) -> None:
        # no class output: pred and probabilities are None in the records (labels may be -1: a layout without
        # classes, clamped only for the gather below, whose value is unused then)
        if logits is None:
            probs = torch.full((labels.shape[0], self.num_classes), float("nan"), device=labels.device)
        else:
            probs = torch.softmax(logits.float(), 1)
        prob, pred = probs.max(1) if logits is not None else (probs[:, 0], torch.zeros_like(labels))
        if per_image is None:  # no segmentation output: the mask fields are None
            zeros = torch.zeros_like(labels)
            per_image = {"dice": zeros, "iou": zeros, "tp": zeros, "fn": zeros, "fp": zeros, "tn": zeros,
                         "annotated": torch.zeros_like(labels, dtype=torch.bool)}
            no_mask = True
        else:
            no_mask = False
        numbers = torch.stack([
            labels.double(), pred.double(), prob.double(),
            probs.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1).double(),
            per_image["dice"].double(), per_image["iou"].double(), (per_image["tp"] + per_image["fn"]).double(),
            (per_image["tp"] + per_image["fp"]).double(), per_image["annotated"].double(),
            per_image["tp"].double(), per_image["fp"].double(), per_image["fn"].double(), per_image["tn"].double(),
        ], 1).cpu().tolist()  # one device-to-host copy per batch
        ids = batch.get("id") or [str(len(self._records) + i) for i in range(len(numbers))]
        for image_id, row in zip(ids, numbers):
            label, pred_cls, p_pred, p_true, dice, iou, true_pixels, pred_pixels, annotated, tp, fp, fn, tn = row
            no_cls = logits is None
            self._records.append({
                "id": image_id, "label": int(label), "pred": None if no_cls else int(pred_cls),
                "prob": None if no_cls else p_pred, "prob_true": None if no_cls else p_true,
                "dice": dice if annotated else None, "iou": iou if annotated else None,
                "tumour_pixels": int(true_pixels) if annotated else None,
                "pred_pixels": None if no_mask else int(pred_pixels),
                "annotated": bool(annotated), "tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn),
            })

    # ------------------------------------------------------------------------------------------ merging
    def merge(self, other: "MultiTaskMetrics") -> "MultiTaskMetrics":
        """Add the counts (and per-image records) of `other`, as if its batches had been given to this object."""
        if other.num_classes != self.num_classes or other.threshold != self.threshold:
            raise ValueError("can only merge metrics with the same number of classes and threshold")
        if other._state is None:
            return self
        mine = self.state_tensors(other._state["pixels"].device if self._state is None else None)
        for name, tensor in other._state.items():
            mine[name] += tensor.to(device=mine[name].device, dtype=mine[name].dtype)
        self._records.extend(other._records)
        if other._has_seg is not None:
            if self._has_seg is not None and self._has_seg != other._has_seg:
                raise ValueError("cannot merge metrics with a segmentation output into metrics without one")
            self._has_seg = other._has_seg
        if other._has_cls is not None:
            if self._has_cls is not None and self._has_cls != other._has_cls:
                raise ValueError("cannot merge metrics with a classification output into metrics without one")
            self._has_cls = other._has_cls
        return self

    def sync(self) -> None:
        """Sum the counts of all torch.distributed ranks (a no-op without an initialised process group).

        Every rank must call it, once per evaluation; afterwards each rank holds the totals. Per-image records
        are gathered too (in rank order).
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        if self._synced:
            raise RuntimeError("sync() was already called for this evaluation; counts would be summed twice")
        device = None
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())  # NCCL reduces CUDA tensors only
        state = self.state_tensors(device)
        for tensor in state.values():
            dist.all_reduce(tensor)
        if self.keep_per_image:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self._records)
            self._records = [record for part in gathered for record in part]
        self._synced = True

    # ------------------------------------------------------------------------------------------ results
    def compute(self) -> dict:
        """Every figure of `METRIC_DEFINITIONS_MD` as Python floats (counts as ints, the matrix as lists)."""
        state = {name: tensor.cpu().tolist() for name, tensor in self.state_tensors().items()}
        results = {}
        if self._has_cls is not False:  # a segmentation-only run has no classification figures
            results.update(classification_figures(state["confusion"], self.class_names))
        else:
            results["num_images"] = int(state["seen"][0])
        if self._has_seg is not False:  # no figures for a task the model does not have
            results.update(segmentation_figures(state["pixels"], state["images"], state["overlap"]))
        return results

    def per_image_records(self) -> list[dict]:
        """One dict per image: id, label, pred, prob (of the predicted class), prob_true, dice, iou, tumour_pixels,
        pred_pixels (dice / iou / tumour_pixels are None for images without an annotation), annotated and the
        image's pixel counts tp, fp, fn, tn."""
        if not self.keep_per_image:
            raise RuntimeError("per-image records are only kept with MultiTaskMetrics(..., keep_per_image=True)")
        return list(self._records)

    def classification_report(self, digits: int = 4) -> str:
        """scikit-learn's classification report for the accumulated predictions.

        The confusion matrix is a sufficient statistic of every figure in the report, so the (label, prediction)
        pairs are rebuilt from it: this works unchanged after `merge()` / `sync()`, with no per-image storage.
        """
        from sklearn.metrics import classification_report

        confusion = self.compute()["confusion_matrix"]
        if not sum(map(sum, confusion)):
            raise RuntimeError("no images were evaluated: call update() before classification_report()")
        y_true, y_pred = [], []
        for true_class, row in enumerate(confusion):
            for pred_class, count in enumerate(row):
                y_true += [true_class] * count
                y_pred += [pred_class] * count
        return classification_report(y_true, y_pred, labels=list(range(self.num_classes)),
                                     target_names=self.class_names, digits=digits, zero_division=0)


def classification_figures(confusion: list[list[int]], class_names: Sequence[str]) -> dict:
    """Accuracy, per-class / macro / weighted precision, recall and F1 from a confusion matrix (rows: truth)."""
    k = len(class_names)
    total = sum(map(sum, confusion))
    support = [sum(confusion[c]) for c in range(k)]
    predicted = [sum(confusion[r][c] for r in range(k)) for c in range(k)]
    results: dict = {"accuracy": _ratio(sum(confusion[c][c] for c in range(k)), total)}
    per_class: dict[str, list[float]] = {"precision": [], "recall": [], "f1": []}
    for c, name in enumerate(class_names):
        tp = confusion[c][c]
        values = {"precision": _ratio(tp, predicted[c]), "recall": _ratio(tp, support[c]),
                  "f1": _ratio(2 * tp, support[c] + predicted[c])}  # 2TP / (2TP + FP + FN)
        # F1 needs the class in the truth: a class absent from the subset but predicted there has no F1 (its
        # recall is undefined), not 0
        denominators = {"precision": predicted[c], "recall": support[c], "f1": support[c]}
        for metric, value in values.items():
            per_class[metric].append(value)
            # a class absent from the subset (or never predicted) has no such figure: None, shown as `–`,
            # never 0; the averages below keep scikit-learn's zero_division=0
            results[f"{metric}_{name}"] = value if denominators[metric] > 0 else None
    # Macro averages run over the classes that occur in the truth or the predictions (scikit-learn's default
    # labels): a subset without a class (e.g. the leaked images) is not penalised for a class it cannot contain.
    present = [c for c in range(k) if support[c] + predicted[c] > 0] or list(range(k))
    for metric, values in per_class.items():
        results[f"{metric}_macro"] = sum(values[c] for c in present) / len(present)
        results[f"{metric}_weighted"] = _ratio(sum(v * s for v, s in zip(values, support)), total)
    results["confusion_matrix"] = confusion
    results["num_images"] = total
    return results


def segmentation_figures(pixels: Sequence[int], images: Sequence[int], overlap: Sequence[float]) -> dict:
    """The segmentation figures from summed pixel counts (TP, FP, FN, TN), image counts (annotated, tumour,
    empty, empty with a false positive) and sums of per-image Dice / IoU (tumour images, all annotated)."""
    tp, fp, fn, tn = pixels
    seg_images, tumour_images, empty_images, empty_fp = images
    dice_bg = _ratio(2 * tn, 2 * tn + fp + fn)
    iou_bg = _ratio(tn, tn + fp + fn)
    dice_global = _ratio(2 * tp, 2 * tp + fp + fn)
    iou_global = _ratio(tp, tp + fp + fn)
    return {
        # no tumour image: tumour Dice / IoU do not exist (None, shown as `–`), they are not 0
        "dice": _ratio(overlap[_DICE_TUMOUR], tumour_images) if tumour_images else None,
        "iou": _ratio(overlap[_IOU_TUMOUR], tumour_images) if tumour_images else None,
        "dice_global": dice_global,
        "iou_global": iou_global,
        "dice_2class": (dice_bg + dice_global) / 2,
        "miou_2class": (iou_bg + iou_global) / 2,
        "dice_all_images": _ratio(overlap[_DICE_ALL], seg_images),
        "iou_all_images": _ratio(overlap[_IOU_ALL], seg_images),
        "pixel_accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "empty_fp_rate": _ratio(empty_fp, empty_images) if empty_images else None,
        "num_seg_images": seg_images,
        "num_tumour_images": tumour_images,
        "num_empty_images": empty_images,
    }
