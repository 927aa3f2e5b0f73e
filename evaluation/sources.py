"""What test.py scores, "a source": the run's own split (`own_split`), or another dataset through its layout and
label map (`other_dataset`, `test.py --data-format brisc|imagefolder|pairs`). A `Source` holds everything in
which the two differ (dataset and indexer, the leak or overlap check, the label space, the figures that are
absent and why, the output folder, extra metrics.json keys); `evaluation.pipeline.run_test` runs the same steps
for both. Another dataset's images with an exact or near copy (datasets.cross_dataset_copies) in the run's training root
(train and test splits) form its `leaked` subset. docs/pipeline.md compares the two in a table.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from datasets.cross_dataset_copies import cross_matches, split_samples
from datasets.errors import DataError
from datasets.factory import sample_index
from datasets.imagefolder import class_folders, folder_samples
from datasets.index import Sample, check_unique
from datasets.naming import CLASS_NAMES
from evaluation.labels import LabelSpace, label_figures, label_intervals, label_space
from datasets.splits import split_role
from evaluation.leaks import leak_check
from evaluation.options import TestOptions
from evaluation.subsets import excluded_list
from utils.config import (LAYOUT_TASKS, Config, ConfigError, DataConfig, LayoutConfig, config_from_dict,
                          current_key_path, parse_override)

Overlap = Callable[[Sequence[Sample]], tuple[Optional[dict], dict]]

WHY_ABSENT = {"imagefolder": {"segmentation": "the imagefolder layout has no masks"},
              "pairs": {"classification": "the pairs layout has no classes"}}
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
  data.split.near_threshold) copy in the run's training root (train and test splits); `leak_free`: the others.
"""


@dataclass
class Source:
    """What the pipeline scores and how it differs from the run's own split."""

    data: DataConfig  # the dataset's settings (root, layout, resize, ...)
    split: str
    split_path: Optional[Path]  # the run's split.json (own split); None for another dataset
    index: Optional[Callable[[Path, str], list[Sample]]]  # the sample indexer; None: the layout's own
    score_cls: bool
    score_seg: bool
    check_overlap: Overlap  # samples -> (stem -> copies in the training data or None, description)
    overlap_name: str  # console: "leak check for the test split" / "overlap check"
    title: str  # console: what was scored, after the model's name
    progress: str  # progress-bar label
    space: Optional[LabelSpace] = None  # another dataset's label space; None: the model's classes
    spacing: Optional[list] = None  # [row, col] mm per pixel, or None: HD95 / ASSD in pixels
    gated: bool = False  # masks emptied where the classifier says no_tumor
    has_loss: bool = True  # the training loss is defined (the run's own data only)
    absent: dict[str, str] = field(default_factory=dict)  # kind of figure -> why it is absent
    extra: dict = field(default_factory=dict)  # further metrics.json keys
    definitions: str = ""  # appended to metric_definitions.md
    folder: Callable[[str], str] = lambda name: name  # test.py's output folder name -> this source's

    @property
    def model_space(self) -> bool:
        """Scored in the model's own classes (calibration, per-class breakdowns apply)."""
        return self.space is None or self.space.is_model_space

    @property
    def metric_tasks(self) -> tuple[str, ...]:
        """The outputs `MultiTaskMetrics` counts: both on the own split, the masks only on another dataset."""
        if self.space is None:
            return tuple(t for t, on in (("cls", self.score_cls), ("seg", self.score_seg)) if on)
        return ("seg",) if self.score_seg else ()

    def truth(self, labels: np.ndarray) -> np.ndarray:
        """Label-space indices of the true labels (brisc samples carry model-class indices)."""
        if self.space is None or self.data.format != "brisc":
            return labels
        return np.asarray(self.space.of_model_class)[labels]

    def label_names(self) -> list[str]:
        return CLASS_NAMES if self.space is None else self.space.names


# --------------------------------------------------------------------------------------------- the run's own split
def own_split(cfg: Config, opts: TestOptions, run_dir: Path, has_cls: bool, has_seg: bool) -> Source:
    """The run's own data (`opts.data_root` replaces its root) and split; sets `cfg.data.root` accordingly."""
    if opts.data_root:
        cfg.data.root = opts.data_root
        cfg.data.generated.enabled = False
    split_path = run_dir / "split.json"
    gated = bool(cfg.eval.gate_masks if opts.gate_masks is None else opts.gate_masks) and has_seg and has_cls

    def check(samples: Sequence[Sample]) -> tuple[Optional[dict], dict]:
        leaked, info = leak_check(Path(cfg.data.root), opts.split, split_path, samples,
                                  cache_dir=run_dir / "leak_check", index=sample_index(cfg.data),
                                  near_threshold=cfg.data.split.near_threshold)
        if leaked is not None:
            info["excluded"] = excluded_list(leaked, [s.stem for s in samples], info["against"])
        return leaked, info

    return Source(data=cfg.data, split=opts.split, split_path=split_path, index=None, score_cls=has_cls,
                  score_seg=has_seg, check_overlap=check, overlap_name=f"leak check for the {opts.split} split",
                  title=f", {opts.split} split ({split_role(opts.split)})", progress=f"test {opts.split}",
                  spacing=opts.spacing or cfg.data.layout.spacing,
                  gated=gated)


# --------------------------------------------------------------------------------------------- another dataset
def other_dataset(cfg: Config, opts: TestOptions, run_dir: Path, has_cls: bool, has_seg: bool) -> Source:
    """The `opts.split` split of the dataset at `opts.data_root` in layout `opts.data_format`."""
    score_cls, score_seg = _check_other_options(opts, has_cls, has_seg)
    trained = dataclasses.replace(cfg.data)  # the data the run trained on: the overlap check's reference
    layout = layout_settings(cfg.data, opts.data_opts or [])
    space = label_space(opts.class_map if opts.class_map is not None else layout.class_map)
    # the other dataset's pixel spacing: --spacing or --layout data.layout.spacing=[r,c] (the run's is its own)
    spacing = opts.spacing or layout.spacing
    data = dataclasses.replace(cfg.data, root=str(opts.data_root), format=opts.data_format,
                               layout=dataclasses.replace(layout, class_map={}, spacing=spacing),
                               generated=dataclasses.replace(cfg.data.generated, enabled=False))
    absent = absent_figures(data.format, score_cls, score_seg, space.is_model_space)
    extra = {"data_format": data.format, "trained_on": str(trained.root), "spacing": spacing,
             "label_space": {"scoring": "model classes" if space.is_model_space else "mapped labels",
                             "labels": space.names, "class_map": space.class_map,
                             "model_classes": {c: space.names[i] for c, i in zip(CLASS_NAMES, space.of_model_class)}},
             "absent_figures": absent}
    return Source(data=data, split=opts.split, split_path=None, index=external_index(data, space), score_cls=score_cls,
                  score_seg=score_seg, overlap_name="overlap check",
                  check_overlap=lambda samples: overlap_check(samples, trained, cache_dir=run_dir / "leak_check"),
                  title=f" trained on {trained.root}, scored on {data.root} ({data.format}, {opts.split} split)",
                  progress=f"{data.format} {opts.split}", space=space, spacing=spacing, gated=False, has_loss=False,
                  absent=absent, extra=extra, definitions=EXTERNAL_MD,
                  folder=lambda name: output_name(str(opts.data_root), name))


def _check_other_options(opts: TestOptions, has_cls: bool, has_seg: bool) -> tuple[bool, bool]:
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


def external_index(data_cfg: DataConfig, space: LabelSpace) -> Callable[[Path, str], list[Sample]]:
    """The layout's indexer, labelling imagefolder samples by `space` (pairs: unlabelled; brisc: the model's
    classes, mapped afterwards by `Source.truth`, so no-tumour images keep their empty masks)."""
    if data_cfg.format != "imagefolder":
        return sample_index(data_cfg)

    def index(root: Path, split: str) -> list[Sample]:
        _, class_dirs = class_folders(root, split, data_cfg.layout.train_dir, data_cfg.layout.test_dir)
        samples = [s for d in class_dirs for s in folder_samples(d, space.label_of_folder(d))]
        samples.sort(key=lambda s: s.stem)
        check_unique(samples)
        return samples

    return index


def layout_settings(data: DataConfig, overrides: Sequence[str]) -> LayoutConfig:
    """The run's `data.layout` (spacing: none, the run's is its own data's) with `overrides`
    (`data.layout.mask_suffix=_mask`, ...) applied and validated by the schema."""
    paths = []
    for text in overrides:
        path = current_key_path(parse_override(text)[0], f"from --layout {text}")
        if len(path) < 3 or path[:2] != ["data", "layout"]:
            keys = ", ".join(f"data.layout.{f.name}" for f in dataclasses.fields(LayoutConfig))
            raise ConfigError(f"--layout {text}: --layout sets the other dataset's layout keys only ({keys})")
        paths.append(f"{'.'.join(path)}={text.split('=', 1)[1]}")
    base = {"layout": {**dataclasses.asdict(data.layout), "spacing": None}}
    return config_from_dict({"data": base}, paths).data.layout


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
        for stem, found in cross_matches(eval_samples, samples, trained.split.near_threshold, cache_dir).items():
            leaked.setdefault(stem, []).extend(f"{split}/{m}" for m in found["matches"])
            kinds.setdefault(stem, {})[split] = found["kind"]
    excluded = []
    for stem in sorted(leaked):
        kind = "exact" if "exact" in kinds[stem].values() else "near"
        where = " and ".join(f"{split} ({k})" for split, k in sorted(kinds[stem].items()))
        how = ("identical decoded pixels" if kind == "exact"
               else f"thumbnail correlation >= {trained.split.near_threshold}")
        excluded.append({"stem": stem, "kind": kind, "matches": sorted(leaked[stem]),
                         "reason": f"{how} to image(s) of {root}: {where}"})
    by_split = {split: {"images": len(samples), **{kind: sum(1 for k in kinds.values() if k.get(split) == kind)
                                                   for kind in ("exact", "near")}} for split, samples in seen.items()}
    info = {"applied": True, "against": f"{root} ({' and '.join(f'{s} split' for s in seen)})",
            "num_training_images": sum(len(v) for v in seen.values()), "near_threshold": trained.split.near_threshold,
            "method": "datasets.cross_dataset_copies.cross_matches (identical decoded pixels, or 32x32 thumbnail correlation "
                      ">= near_threshold)",
            "num_exact": sum(1 for e in excluded if e["kind"] == "exact"),
            "num_near": sum(1 for e in excluded if e["kind"] == "near"), "by_split": by_split, "excluded": excluded}
    return leaked, info


def output_name(data_root: str, folder: str) -> str:
    """`test_ext_<root name>_<rest of test.py's folder name>`, e.g. test_ext_kaggle_test_tta."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data_root).resolve().name) or "data"
    return f"test_ext_{name}_{folder[len('test_'):]}"


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


# --------------------------------------------------------------------------------------------- label-space figures
def add_label_figures(subsets: dict[str, dict], indices: dict[str, np.ndarray], truth: np.ndarray, pred: np.ndarray,
                      label_probs: np.ndarray, space: LabelSpace, resamples: int, seed: int,
                      groups: Optional[np.ndarray] = None) -> None:
    """Each non-empty subset's label-space figures (`evaluation.labels.label_figures`) and their intervals
    (resampling the scan `groups`, one id per image, when given)."""
    for name, index in indices.items():
        if not len(index):
            continue
        subsets[name].update(label_figures(truth[index], pred[index], label_probs[index], space))
        if subsets[name].get("ci95") is not None:
            subsets[name]["ci95"].update(label_intervals(truth[index], pred[index], space, resamples, seed,
                                                         groups=None if groups is None else groups[index]))


def with_labels(row: dict, n: int, truth: np.ndarray, pred: np.ndarray, logits: np.ndarray,
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
