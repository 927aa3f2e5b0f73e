"""Source-confound audit: how well do trivial file and image properties alone predict the class?

    python -m datasets.check ROOT --confounds

A small random forest (scikit-learn; a single tree for one property) is cross-validated (stratified,
5 folds, seeded) on properties that say nothing about anatomy: channels stored in the file, width, height,
aspect ratio, file size, bytes per pixel, estimated JPEG quality, mean intensity, background level (mean of
the outer 5 % frame) and the dark fraction (pixels < 10). It reports the balanced accuracy with all
properties and with each one alone (chance is 1 / classes), and each class against the rest. Near 1.0 means
the labels can be read without looking at the anatomy: a model can learn the source of the images instead
of the tumour.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .decode import read_grey
from .index import Sample, index_split
from .naming import CLASS_NAMES

PROPERTIES = ("channels", "width", "height", "aspect", "file_kb", "bytes_per_pixel", "jpeg_quality",
              "mean_intensity", "background", "dark_fraction")
_SOF = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
# IJG standard luminance quantisation table (quality 50); its sum scales with the quality setting.
_STD_LUMA_SUM = sum([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69,
                     56, 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81,
                     104, 113, 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])


def _jpeg_segments(data: bytes):
    """(marker, payload) of the JPEG header segments up to the first start-of-scan."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        yield marker, data[i + 4:i + 2 + length]
        if marker == 0xDA:
            return
        i += 2 + length


def jpeg_channels(path: Union[str, Path]) -> int:
    """Components of a JPEG from its start-of-frame header (0 when not found), without decoding."""
    with open(path, "rb") as handle:
        data = handle.read(65536)
    for marker, payload in _jpeg_segments(data):
        if marker in _SOF and len(payload) >= 6:
            return payload[5]
    return 0


def jpeg_quality(path: Union[str, Path]) -> float:
    """The IJG quality (1-100) that produces the file's luminance quantisation table; 0 when not a JPEG."""
    with open(path, "rb") as handle:
        data = handle.read(65536)
    for marker, payload in _jpeg_segments(data):
        if marker == 0xDB and payload:
            precision, table_id = payload[0] >> 4, payload[0] & 0x0F
            if table_id != 0:
                continue
            values = np.frombuffer(payload[1:1 + 64 * (precision + 1)], dtype=">u2" if precision else np.uint8)
            scale = 100.0 * float(values.sum()) / _STD_LUMA_SUM
            return float(np.clip((200.0 - scale) / 2.0 if scale <= 100 else 5000.0 / scale, 1, 100))
    return 0.0


def image_properties(path: Union[str, Path]) -> list[float]:
    """The audit's properties of one file, in the order of `PROPERTIES`."""
    path = Path(path)
    grey = read_grey(path)
    height, width = grey.shape
    size = path.stat().st_size
    frame = max(1, round(0.05 * min(height, width)))
    border = np.concatenate([grey[:frame].ravel(), grey[-frame:].ravel(), grey[:, :frame].ravel(),
                             grey[:, -frame:].ravel()])
    return [float(jpeg_channels(path)), float(width), float(height), width / height, size / 1024,
            size / (width * height), jpeg_quality(path), float(grey.mean()), float(border.mean()),
            float(np.mean(grey < 10))]


def property_table(samples: Sequence[Sample], workers: Optional[int] = None) -> np.ndarray:
    """(N, len(PROPERTIES)) float array of every sample's properties."""
    n_workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(n_workers) as pool:
        return np.asarray(list(pool.map(image_properties, [s.image for s in samples])), dtype=np.float64)


def audit_properties(features: np.ndarray, labels: Sequence[int], names: Sequence[str] = PROPERTIES,
                     folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated balanced accuracy of a small random forest on all properties and on each alone,
    plus the per-class recall and one-vs-rest balanced accuracy with all of them (which class they give away)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import balanced_accuracy_score, recall_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.tree import DecisionTreeClassifier

    labels = np.asarray(labels)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)

    def predict(x: np.ndarray, y: np.ndarray = labels) -> np.ndarray:
        # one property: a single tree finds any threshold rule; all of them: a small forest
        model = (DecisionTreeClassifier(min_samples_leaf=3, class_weight="balanced", random_state=seed)
                 if x.shape[1] == 1 else
                 RandomForestClassifier(n_estimators=60, min_samples_leaf=3, random_state=seed, n_jobs=1))
        return cross_val_predict(model, x, y, cv=splitter)

    overall = predict(features)
    classes = sorted(set(labels.tolist()))
    recalls = recall_score(labels, overall, labels=classes, average=None)
    return {
        "balanced_accuracy": float(balanced_accuracy_score(labels, overall)),
        # class c against the rest, from the same predictions: 1.0 = that class is given away by its files
        "one_vs_rest": {int(c): float(balanced_accuracy_score(labels == c, overall == c)) for c in classes},
        "chance": 1.0 / len(classes),
        "per_property": {name: float(balanced_accuracy_score(labels, predict(features[:, [k]])))
                         for k, name in enumerate(names)},
        # one property, one class against the rest (a balanced binary tree): which property gives a class away
        "per_property_one_vs_rest": {
            name: {int(c): float(balanced_accuracy_score(labels == c, predict(features[:, [k]], labels == c)))
                   for c in classes} for k, name in enumerate(names)},
        "recall_per_class": {int(c): float(r) for c, r in zip(classes, recalls)},
        "images": int(len(labels)),
        "folds": folds,
        "classifier": "all: RandomForestClassifier(60 trees, min_samples_leaf=3); one property: DecisionTreeClassifier"
                      "(min_samples_leaf=3, balanced class weights); stratified CV",
    }


def confound_audit(root: Union[str, Path], split: str = "train", folds: int = 5, seed: int = 0,
                   workers: Optional[int] = None) -> dict:
    """`audit_properties` on every image of `split`; the per-class recall is keyed by class name."""
    samples = index_split(root, split)
    result = audit_properties(property_table(samples, workers), [s.label for s in samples], folds=folds, seed=seed)
    for key in ("recall_per_class", "one_vs_rest"):
        result[key] = {CLASS_NAMES[c]: r for c, r in result[key].items()}
    result["per_property_one_vs_rest"] = {name: {CLASS_NAMES[c]: r for c, r in per_class.items()}
                                          for name, per_class in result["per_property_one_vs_rest"].items()}
    result["split"] = split
    return result


def render_audit(result: dict) -> str:
    """Console summary of `confound_audit`."""
    lines = [f"source-confound audit ({result['split']} split, {result['images']} images, {result['folds']}-fold "
             f"stratified CV; balanced accuracy, chance {result['chance']:.2f}):",
             f"  all properties: {result['balanced_accuracy']:.3f}  (recall per class: "
             + ", ".join(f"{k} {v:.3f}" for k, v in result["recall_per_class"].items()) + ")",
             "  one class against the rest: " + ", ".join(f"{k} {v:.3f}" for k, v in result["one_vs_rest"].items()),
             "  each property alone: 4 classes | each class against the rest ("
             + ", ".join(result["one_vs_rest"]) + ")"]
    ranked = sorted(result["per_property"].items(), key=lambda kv: -kv[1])
    lines += [f"    {name:16s} {value:.3f} | " + " ".join(f"{v:.3f}" for v in
                                                      result["per_property_one_vs_rest"][name].values())
              for name, value in ranked]
    given_away = [k for k, v in result["one_vs_rest"].items() if v > 0.9]
    if given_away:
        lines.append(f"  -> {', '.join(given_away)} can be told from the rest by file/image properties alone, "
                     "without the anatomy: a model may learn the source instead of the tumour")
    return "\n".join(lines)
