"""Score a checkpoint on another dataset's layout: `test.py --data-root OTHER --data-format brisc|imagefolder|pairs`.

- Labels: `evaluation.labels` (the class map and the figures in the mapped label space); the model's own classes
  are scored as in test.py when the map leaves them alone.
- Figures the layout supports, only: imagefolder has no masks (no segmentation figures), pairs no classes (no
  classification figures); metrics.json lists the absent ones and why (`absent_figures`).
- Overlap. Images of the other dataset with an exact or near copy (datasets.cross_dataset_copies) in the data the run
  trained on (its root's train split) or in that root's test split (seen by whoever tuned the recipe) form the
  `leaked` subset; the rest are `leak_free`, the headline by default, as for test.py.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from datasets.cross_dataset_copies import cross_matches, split_samples
from datasets.errors import DataError
from datasets.factory import build_eval_dataset, sample_index
from datasets.imagefolder import class_folders, folder_samples
from datasets.index import Sample, check_unique
from datasets.naming import CLASS_NAMES, PLANES
from evaluation.breakdowns import breakdowns
from evaluation.calibration import calibration_summary, softmax
from evaluation.conventions import CONVENTIONS_MD, output_folder_name
from evaluation.inference import collect_outputs, eval_loader
from evaluation.labels import LabelSpace, label_figures, label_intervals, label_probabilities, label_space
from evaluation.metrics import METRIC_DEFINITIONS_MD, MultiTaskMetrics
from evaluation.native import NativeCounts
from evaluation.per_image import per_image_rows, write_per_image_csv
from evaluation.report import (TestOptions, check_options, fit_on_validation, per_image_table, print_summary,
                               score_subsets, scored_results)
from model import model_tasks
from model.loading import load_model_from_checkpoint
from utils.config import ConfigError, DataConfig, config_from_dict, parse_override
from utils.runs import write_json_atomic
from utils.runtime import eval_dtype, select_device
from visualization.confusion import save_confusion_matrix

LAYOUT_TASKS = {"brisc": ("cls", "seg"), "imagefolder": ("cls",), "pairs": ("seg",)}
WHY_ABSENT = {"imagefolder": {"segmentation": "the imagefolder layout has no masks"},
              "pairs": {"classification": "the pairs layout has no classes"}}
# data.* keys that describe the other dataset's layout, settable with test.py --opts
LAYOUT_KEYS = ("train_dir", "test_dir", "class_map", "mask_suffix", "mask_threshold", "test_fraction", "split_seed",
               "spacing")
EXTERNAL_MD = """
## Another dataset (`--data-format`)

- Labels: `--class-map` maps the dataset's folder names and the model's class names into one label space (names
  it does not list map to themselves). Predicted label = the map of the model's top class; a label's probability
  = the sum of the probabilities of the model classes mapping to it.
- `balanced_accuracy`: mean recall over the labels present in the truth. `out_of_set_rate`: share of images whose
  predicted label is not a label of the scored split (e.g. meningioma on a glioma-vs-normal set).
- With two labels, one of them no_tumor's: `detection_sensitivity` (recall of the tumour label),
  `detection_specificity` (recall of the no-tumour label) and `detection_auc` (scikit-learn's ROC AUC of the
  summed tumour-label probability; none when a subset holds one label only).
- `leaked`: images with an exact (identical decoded pixels) or near (32x32 thumbnail correlation >= the run's
  data.near_threshold) copy in the run's training root (train and test splits); `leak_free`: the others.
"""


# --------------------------------------------------------------------------------------------- datasets
def external_index(data_cfg: DataConfig, space: LabelSpace) -> Callable[[Path, str], list[Sample]]:
    """The layout's indexer, labelling imagefolder samples by `space` (pairs: unlabelled; brisc: the model's
    classes, mapped afterwards by `truth_labels`, so no-tumour images keep their empty masks)."""
    if data_cfg.format != "imagefolder":
        return sample_index(data_cfg)

    def index(root: Path, split: str) -> list[Sample]:
        _, class_dirs = class_folders(root, split, data_cfg.train_dir, data_cfg.test_dir)
        samples = [s for d in class_dirs for s in folder_samples(d, space.label_of_folder(d))]
        samples.sort(key=lambda s: s.stem)
        check_unique(samples)
        return samples

    return index


def truth_labels(labels: np.ndarray, fmt: str, space: LabelSpace) -> np.ndarray:
    """Label-space indices of the true labels of scored samples (brisc samples carry model-class indices)."""
    return np.asarray(space.of_model_class)[labels] if fmt == "brisc" else labels


def layout_settings(data: DataConfig, overrides: Sequence[str]) -> dict:
    """{layout key: value}: the run's `data.*` layout keys (spacing: none, the run's is its own data's) with
    `overrides` (`data.mask_suffix=_mask`, ...) applied and validated by the schema."""
    for text in overrides:
        path, _ = parse_override(text)
        if len(path) < 2 or path[0] != "data" or path[1] not in LAYOUT_KEYS:
            raise ConfigError(f"--opts {text}: with --data-format, --opts sets the other dataset's layout keys only "
                              f"(data.{', data.'.join(LAYOUT_KEYS)})")
    base = {key: getattr(data, key) for key in LAYOUT_KEYS}
    base["spacing"] = None
    checked = config_from_dict({"data": base}, list(overrides)).data
    return {key: getattr(checked, key) for key in LAYOUT_KEYS}


# --------------------------------------------------------------------------------------------- overlap
def overlap_check(eval_samples: Sequence[Sample], trained: DataConfig, cache_dir: Optional[Path] = None
                  ) -> tuple[Optional[dict[str, list[str]]], dict]:
    """(evaluated stem -> `split/stem` of its copies in the run's training root, or None when that root cannot
    be read; a description for metrics.json with the excluded images, exact or near, and the counts)."""
    root = Path(trained.root)
    try:
        seen = split_samples(root, sample_index(trained))
    except DataError as exc:
        return None, {"applied": False, "reason": f"the run's training data '{root}' could not be read ({exc}); "
                                                  "no overlap-free subset"}
    if "train" not in seen:
        return None, {"applied": False, "reason": f"the run's training data '{root}' has no readable train split"}
    leaked: dict[str, list[str]] = {}
    kinds: dict[str, dict[str, str]] = {}
    for split, samples in seen.items():
        for stem, found in cross_matches(eval_samples, samples, trained.near_threshold, cache_dir).items():
            leaked.setdefault(stem, []).extend(f"{split}/{m}" for m in found["matches"])
            kinds.setdefault(stem, {})[split] = found["kind"]
    excluded = []
    for stem in sorted(leaked):
        kind = "exact" if "exact" in kinds[stem].values() else "near"
        where = " and ".join(f"{split} ({k})" for split, k in sorted(kinds[stem].items()))
        how = "identical decoded pixels" if kind == "exact" else f"thumbnail correlation >= {trained.near_threshold}"
        excluded.append({"stem": stem, "kind": kind, "matches": sorted(leaked[stem]),
                         "reason": f"{how} to image(s) of {root}: {where}"})
    by_split = {split: {"images": len(samples), **{kind: sum(1 for k in kinds.values() if k.get(split) == kind)
                                                   for kind in ("exact", "near")}} for split, samples in seen.items()}
    info = {"applied": True, "against": f"{root} ({' and '.join(f'{s} split' for s in seen)})",
            "num_training_images": sum(len(v) for v in seen.values()), "near_threshold": trained.near_threshold,
            "method": "datasets.cross_dataset_copies.cross_matches (identical decoded pixels, or 32x32 thumbnail correlation "
                      ">= near_threshold)",
            "num_exact": sum(1 for e in excluded if e["kind"] == "exact"),
            "num_near": sum(1 for e in excluded if e["kind"] == "near"), "by_split": by_split, "excluded": excluded}
    return leaked, info


# --------------------------------------------------------------------------------------------- the run
def output_name(data_root: str, folder: str) -> str:
    """`test_ext_<root name>_<rest of test.py's folder name>`, e.g. test_ext_kaggle_test_tta."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data_root).resolve().name) or "data"
    return f"test_ext_{name}_{folder[len('test_'):]}"


def _check_external_options(opts: TestOptions, has_cls: bool, has_seg: bool) -> tuple[bool, bool]:
    """(score classification, score segmentation) for the layout; refuses options that do not apply."""
    if not opts.data_root:
        raise ConfigError("--data-format scores another dataset: give its root with --data-root")
    if opts.data_format not in LAYOUT_TASKS:
        raise ConfigError(f"--data-format must be one of {', '.join(LAYOUT_TASKS)}, got '{opts.data_format}'")
    if opts.split == "val":
        raise ConfigError("--split val is part of the run's own training data; with --data-format score the other "
                          "dataset's test (or train) split")
    if opts.gradcam:
        raise ConfigError("--gradcam is not available with --data-format; drop it")
    if opts.gate_masks:
        raise ConfigError("--gate-masks is not available with --data-format (masks are scored ungated); drop it")
    tasks = LAYOUT_TASKS[opts.data_format]
    score_cls, score_seg = has_cls and "cls" in tasks, has_seg and "seg" in tasks
    if not (score_cls or score_seg):
        raise ConfigError(f"the {opts.data_format} layout has {'classes' if 'cls' in tasks else 'masks'} only and "
                          "the model predicts none of them: nothing to score")
    return score_cls, score_seg


def run_external_test(opts: TestOptions) -> dict:
    """Evaluate `opts.checkpoint` on the `opts.split` split of the dataset at `opts.data_root` (layout
    `opts.data_format`); write metrics.json, per_image.csv, reports; return the metrics."""
    check_options(opts)
    device = select_device(opts.device, key="--device")
    model, cfg, ckpt = load_model_from_checkpoint(opts.checkpoint, device, use_ema=opts.use_ema)
    tasks = model_tasks(model)
    score_cls, score_seg = _check_external_options(opts, "cls" in tasks, "seg" in tasks)
    run_dir = Path(opts.checkpoint).resolve().parent
    split_path = run_dir / "split.json"
    trained = dataclasses.replace(cfg.data)  # the data the run trained on: the overlap check's reference
    layout = layout_settings(cfg.data, opts.data_opts or [])
    space = label_space(opts.class_map if opts.class_map is not None else layout["class_map"])
    # the other dataset's pixel spacing: --spacing or --opts data.spacing=[r,c] (the run's data.spacing is its own)
    spacing = opts.spacing or layout["spacing"]
    data = dataclasses.replace(cfg.data, root=str(opts.data_root), format=opts.data_format, synthetic=False,
                               **{**layout, "class_map": {}, "spacing": spacing})
    threshold, tuning, temperature = fit_on_validation(model, cfg, split_path, device, opts)  # on the run's val
    cfg.data = data
    out_dir = Path(opts.out_dir) if opts.out_dir else run_dir / output_name(opts.data_root, output_folder_name(
        opts.split, opts.subset, opts.tta, threshold, cfg.eval.threshold, opts.tune_threshold, opts.calibrate,
        checkpoint=Path(opts.checkpoint).stem, raw_weights=bool(not opts.use_ema and ckpt.get("ema"))))

    dataset = build_eval_dataset(data, opts.split, None, verbose=False, index=external_index(data, space))
    out_dir.mkdir(parents=True, exist_ok=True)
    num_classes = cfg.model.num_classes
    seg_metrics = MultiTaskMetrics(num_classes, CLASS_NAMES, threshold=threshold, keep_per_image=True)
    native = NativeCounts(dataset.samples, [threshold], data.resize, boundary=True, spacing=spacing or (1.0, 1.0))

    def on_seg(seg: torch.Tensor, batch: dict) -> None:
        if score_seg:
            seg_metrics.update({"seg": seg}, batch)
            native.update(seg, batch["id"])

    logits_t, labels_t, ids = collect_outputs(
        model, eval_loader(cfg, dataset, opts.batch_size, opts.num_workers), device, opts.tta,
        eval_dtype(cfg.eval, device), opts.show_progress, f"{opts.data_format} {opts.split}", keep_cls=score_cls,
        on_seg=on_seg)
    logits = None if logits_t is None else logits_t.numpy()
    labels = labels_t.numpy()
    records = seg_metrics.per_image_records() if score_seg else [
        {"id": stem, "label": int(label)} for stem, label in zip(ids, labels)]
    table = per_image_table(records, logits if space.is_model_space else None, native if score_seg else None,
                            {s.stem: s.plane for s in dataset.samples})

    leaked, leak_info = overlap_check(dataset.samples, trained, cache_dir=run_dir / "leak_check")
    indices, subsets = score_subsets(table, leaked, num_classes, opts.bootstrap, opts.seed)
    headline = opts.subset if opts.subset in indices else "all"
    if headline != opts.subset:
        print(f"note: no overlap check ({leak_info['reason']}); headline subset: all")
    elif not len(indices[headline]):  # every image has a copy in the training data
        headline = "all"
        leak_info["note"] = "every image has a copy in the training data: no leak-free figures; headline subset: all"
        print(f"note: {leak_info['note']}")
    if leaked is not None:
        leak_info["num_leaked"] = len(indices["leaked"])
    subsets["all"]["loss"] = None
    truth = pred = label_probs = None
    if score_cls:  # figures in the label space (the model's own classes when the map leaves them alone)
        truth = truth_labels(labels, data.format, space)
        pred = np.asarray(space.of_model_class)[logits.argmax(1)]
        label_probs = label_probabilities(softmax(logits, temperature or 1.0), space)
        add_label_figures(subsets, indices, truth, pred, label_probs, space, opts.bootstrap, opts.seed)
    calibration = calibration_summary(logits[indices[headline]], labels[indices[headline]], temperature or 1.0) \
        if score_cls and space.is_model_space else None
    breakdown = breakdowns(table, indices[headline], CLASS_NAMES, list(PLANES)) if space.is_model_space or (
        not score_cls) else None

    absent = absent_figures(data.format, score_cls, score_seg, space.is_model_space)
    results = scored_results(opts, model, cfg, ckpt, subsets, headline, threshold if score_seg else None, tuning,
                             temperature, gated=False, loss=None, leak_info=leak_info, breakdown=breakdown,
                             calibration=calibration, spacing=spacing)
    num_params = results["params"]
    results.update({
        "data_format": data.format, "trained_on": str(trained.root), "spacing": spacing,
        "label_space": {"scoring": "model classes" if space.is_model_space else "mapped labels",
                        "labels": space.names, "class_map": space.class_map,
                        "model_classes": {c: space.names[i] for c, i in zip(CLASS_NAMES, space.of_model_class)}},
        "absent_figures": absent,
    })
    write_json_atomic(results, out_dir / "metrics.json")

    (out_dir / "metric_definitions.md").write_text(METRIC_DEFINITIONS_MD + "\n" + CONVENTIONS_MD + EXTERNAL_MD,
                                                   encoding="utf-8")
    subset_of = {} if leaked is None else {s: "leaked" if s in leaked else "leak_free" for s in table.stems}
    rows = per_image_rows(table, subset_of, CLASS_NAMES, temperature or 1.0)
    report = ""
    if score_cls:
        from sklearn.metrics import classification_report

        save_confusion_matrix(results["confusion_matrix"], space.names, out_dir / "confusion_matrix.png")
        report = classification_report(truth, pred, labels=list(range(len(space.names))), target_names=space.names,
                                       digits=4, zero_division=0)
        (out_dir / "classification_report.txt").write_text(report + "\n", encoding="utf-8")
        rows = [_with_labels(row, n, truth, pred, logits, label_probs, space) for n, row in enumerate(rows)]
    write_per_image_csv(rows, out_dir / "per_image.csv")

    shown = f"threshold {threshold:.2f}" if score_seg else "classification only"
    print(f"\n{cfg.model.name} ({num_params:,} parameters) trained on {trained.root}, scored on {data.root} "
          f"({data.format}, {opts.split} split): {len(dataset)} images, {shown}"
          f"{', flip TTA' if opts.tta else ''}")
    if score_cls:
        print(f"labels ({'the model' + chr(39) + 's classes' if space.is_model_space else 'mapped by the class map'}): "
              + ", ".join(f"{name} {int((truth == k).sum())} images" for k, name in enumerate(space.names)))
    for what, why in absent.items():
        print(f"no {what} figures: {why}")
    print_summary(results, bootstrap=opts.bootstrap > 0)
    if report:
        print(f"\nPer-label report (scikit-learn, all images):\n{report}")
    print(f"results written to {out_dir}")
    return results


def add_label_figures(subsets: dict[str, dict], indices: dict[str, np.ndarray], truth: np.ndarray, pred: np.ndarray,
                      label_probs: np.ndarray, space: LabelSpace, resamples: int, seed: int) -> None:
    """Each non-empty subset's label-space figures (`evaluation.labels.label_figures`) and their intervals."""
    for name, index in indices.items():
        if not len(index):
            continue
        subsets[name].update(label_figures(truth[index], pred[index], label_probs[index], space))
        if subsets[name].get("ci95") is not None:
            subsets[name]["ci95"].update(label_intervals(truth[index], pred[index], space, resamples, seed))


def absent_figures(fmt: str, score_cls: bool, score_seg: bool, model_space: bool) -> dict[str, str]:
    """{kind of figure: why it is absent} for metrics.json and the console."""
    absent = dict(WHY_ABSENT.get(fmt, {}))
    if not score_cls and "classification" not in absent:
        absent["classification"] = "the model has no trained classifier"
    if not score_seg and "segmentation" not in absent:
        absent["segmentation"] = "the model has no segmentation output"
    absent["loss"] = "the training loss is not defined on another dataset"
    if score_cls and not model_space:
        absent["calibration"] = "calibration is reported for the model's own classes only"
    return absent


def _with_labels(row: dict, n: int, truth: np.ndarray, pred: np.ndarray, logits: np.ndarray,
                 label_probs: np.ndarray, space: LabelSpace) -> dict:
    """A per_image.csv row with the label-space columns after `plane`: true_label, pred_class (the model's top
    class), pred_label, correct, prob_<label>; the model-class columns of the same names are replaced."""
    head = {key: row[key] for key in ("stem", "subset", "plane")}
    labels = {"true_label": space.names[truth[n]], "pred_class": CLASS_NAMES[int(logits[n].argmax())],
              "pred_label": space.names[pred[n]], "correct": int(truth[n] == pred[n])}
    labels.update({f"prob_{name}": float(label_probs[n, k]) for k, name in enumerate(space.names)})
    rest = {key: value for key, value in row.items() if key not in head and key not in
            ("true_class", "pred_class", "correct") and not key.startswith("prob_")}
    return {**head, **labels, **rest}
