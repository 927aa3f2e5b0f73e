"""A label space shared by another dataset and the model: `--class-map` / `data.layout.class_map`, and the figures in it.

The map sends names to labels: the other dataset's class folder names and the model's class names both pass
through it, and a name it does not list maps to itself (a folder is first read through the usual aliases, e.g.
`notumor` -> `no_tumor`). The labels the model can predict are the images of its classes. When every class maps
to itself this is the model's own 4-class space; otherwise (e.g. `glioma=tumour,meningioma=tumour,
pituitary=tumour,no_tumor=normal`) the predicted label is the map of the model's top class and a label's
probability is the sum of the probabilities of the classes mapping to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from datasets.imagefolder import KAGGLE_CLASS_MAP
from datasets.naming import CLASS_NAMES, NO_TUMOR
from evaluation.stats import (bca_interval, dense_groups, is_degenerate, jackknife_weights, proportion_interval,
                               resample_weights)
from evaluation.metrics import classification_figures
from utils.config import ConfigError, read_yaml_file

LABEL_INTERVALS = ("accuracy", "balanced_accuracy", "f1_macro", "detection_sensitivity", "detection_specificity")


def parse_class_map(text: str) -> dict[str, str]:
    """`name=label,name=label` or a YAML file holding such a mapping (or a config with `data.layout.class_map`)."""
    source = "--class-map"
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        path = Path(text)
        raw = read_yaml_file(path, "--class-map file", "; give NAME=LABEL,... or a YAML mapping file")
        if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
            data = raw["data"]  # data.layout.class_map, or data.class_map in configs older than the sections
            raw = (data.get("layout") or {}).get("class_map", data.get("class_map", {}))
        source = f"--class-map file '{path}'"
    else:
        raw = {}
        for entry in filter(None, (part.strip() for part in text.split(","))):
            name, sep, label = (piece.strip() for piece in entry.partition("="))
            if not (sep and name and label):
                raise ConfigError(f"--class-map entry '{entry}' must look like NAME=LABEL (e.g. notumor=normal)")
            raw[name] = label
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise ConfigError(f"{source} must map names to labels (strings), got {raw!r}; in YAML quote names such as "
                          "'yes', 'no' or 'on', which would otherwise read as true / false")
    return raw


@dataclass
class LabelSpace:
    """The labels the model can predict after the class map, and how names reach them."""

    class_map: dict[str, str]
    names: list[str]  # labels, in the order of the first model class mapping to each
    of_model_class: list[int]  # model class k -> index into names

    @property
    def is_model_space(self) -> bool:
        """Every model class maps to itself: the model's own classes are scored."""
        return self.names == list(CLASS_NAMES)

    @property
    def negative(self) -> int:
        """The label of no_tumor (the negative of tumour detection)."""
        return self.of_model_class[NO_TUMOR]

    @property
    def detects_tumour(self) -> bool:
        """Two labels, one reached by no_tumor alone: tumour versus no tumour (sensitivity / specificity apply)."""
        return len(self.names) == 2 and self.of_model_class.count(self.negative) == 1

    def resolve(self, name: str) -> str:
        """A name's label: the map's entry for it, else that of its usual alias (notumor -> no_tumor), else itself."""
        if name in self.class_map:
            return self.class_map[name]
        alias = KAGGLE_CLASS_MAP.get(name, name)
        return self.class_map.get(alias, alias)

    def label_of_folder(self, folder: Path) -> int:
        """The label index of a class folder; a folder whose label no model class reaches is an error."""
        label = self.resolve(folder.name)
        if label not in self.names:
            raise ConfigError(
                f"class folder '{folder}' maps to '{label}', which the model cannot predict (its classes map to: "
                f"{', '.join(self.names)}); map it with --class-map '{folder.name}=<one of those>' (and map the "
                f"model's classes onto the same labels, e.g. glioma=tumour,meningioma=tumour,pituitary=tumour,"
                f"no_tumor=normal) or leave the folder out")
        return self.names.index(label)


def label_space(class_map: Optional[Mapping[str, str]]) -> LabelSpace:
    """The labels the model's classes reach through `class_map` (none or empty: the model's own classes)."""
    space = LabelSpace(dict(class_map or {}), [], [])
    for name in CLASS_NAMES:
        label = space.resolve(name)
        if label not in space.names:
            space.names.append(label)
        space.of_model_class.append(space.names.index(label))
    return space


def label_probabilities(probs: np.ndarray, space: LabelSpace) -> np.ndarray:
    """(N, labels): each label's probability, the sum over the model classes mapping to it."""
    membership = np.zeros((len(space.of_model_class), len(space.names)))
    membership[np.arange(len(space.of_model_class)), space.of_model_class] = 1.0
    return probs @ membership


def label_figures(truth: np.ndarray, pred: np.ndarray, probs: Optional[np.ndarray], space: LabelSpace) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-label precision / recall / F1, the out-of-set rate and, for two
    labels one of which is no_tumor's, tumour detection sensitivity, specificity and ROC AUC."""
    m = len(space.names)
    confusion = np.zeros((m, m), dtype=np.int64)
    np.add.at(confusion, (truth, pred), 1)
    figures = classification_figures(confusion.tolist(), space.names)
    present = sorted(set(truth.tolist()))
    recalls = [figures[f"recall_{space.names[c]}"] for c in present]
    figures["balanced_accuracy"] = float(np.mean(recalls)) if recalls else None
    outside = ~np.isin(pred, present)
    figures.update({"out_of_set_rate": float(outside.mean()) if len(pred) else None,
                    "num_out_of_set": int(outside.sum()), "labels_in_truth": [space.names[c] for c in present]})
    if space.detects_tumour:
        negative = space.negative
        positive = 1 - negative
        figures.update({"positive_label": space.names[positive], "negative_label": space.names[negative],
                        "detection_sensitivity": figures[f"recall_{space.names[positive]}"],
                        "detection_specificity": figures[f"recall_{space.names[negative]}"], "detection_auc": None})
        if probs is not None and len(present) == 2:
            from sklearn.metrics import roc_auc_score

            figures["detection_auc"] = float(roc_auc_score(truth == positive, probs[:, positive]))
    return figures


def _label_values(truth: np.ndarray, pred: np.ndarray, m: int, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Macro-F1 and balanced accuracy of each weighted resample (rows of `weights`), recall per label."""
    cells = np.zeros((len(truth), m * m))
    cells[np.arange(len(truth)), truth * m + pred] = 1.0
    confusion = (weights @ cells).reshape(-1, m, m)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    support, predicted = confusion.sum(2), confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
        present = support + predicted > 0
        return {"f1_macro": (f1 * present).sum(1) / present.sum(1),
                "balanced_accuracy": np.nanmean(np.where(support > 0, recall, np.nan), axis=1)}


def label_intervals(truth: np.ndarray, pred: np.ndarray, space: LabelSpace, resamples: int, seed: int,
                    level: float = 0.95, groups: Optional[np.ndarray] = None) -> dict:
    """Intervals of `LABEL_INTERVALS` in the label space: Clopper–Pearson for accuracy and detection
    sensitivity / specificity, BCa bootstrap for macro-F1 and balanced accuracy (resampling `groups` when
    given); `label_methods` names the method of each, `label_degenerate` lists resamples that were all equal."""
    if not len(truth) or not resamples:
        return {}
    truth, pred = np.asarray(truth), np.asarray(pred)
    group = dense_groups(groups, len(truth))
    clustered = None if groups is None else group
    correct = truth == pred
    out: dict = {"label_methods": {}, "label_degenerate": []}
    out["accuracy"], out["label_methods"]["accuracy"] = proportion_interval(correct, clustered, level)
    if space.detects_tumour:
        for name, label in (("detection_sensitivity", 1 - space.negative), ("detection_specificity", space.negative)):
            chosen = truth == label
            out[name], out["label_methods"][name] = proportion_interval(
                correct[chosen], None if clustered is None else clustered[chosen], level) if chosen.any() else (
                None, "clopper-pearson")
    m = len(space.names)
    resampled = _label_values(truth, pred, m, resample_weights(group, resamples, seed))
    estimate = _label_values(truth, pred, m, np.ones((1, len(truth))))
    jackknife = _label_values(truth, pred, m, jackknife_weights(group))
    for name in ("f1_macro", "balanced_accuracy"):
        out["label_methods"][name] = "bca bootstrap" + (" (scan groups)" if clustered is not None else "")
        if is_degenerate(resampled[name]):
            out[name] = None
            out["label_degenerate"].append(name)
        else:
            out[name] = bca_interval(float(estimate[name][0]), resampled[name], jackknife[name], level)
    for name in LABEL_INTERVALS:
        out.setdefault(name, None)
    return out
