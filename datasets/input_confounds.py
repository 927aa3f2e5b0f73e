"""The confound audit of what the model sees: trivial statistics of the model's input after a config's
preprocessing, and how well they predict the class.

    python -m datasets.check ROOT --confounds --config configs/brisc_cpu_head.yaml [--audit-limit 1500]

Each image is decoded and placed exactly as the evaluation pipeline does (the config's `data.preprocess`: size,
resize mode, head margin, intensity normalisation; no augmentation), and its first input channel is summarised by
statistics that say nothing about the anatomy (`INPUT_PROPERTIES`): mean and spread, the background share,
where the head sits and how large it is (`geometry.find_head` on the placed uint8 image), the border's mean and
spread, and the high-frequency energy. The same cross-validated classifier as the file audit
(`confounds.audit_properties`) reads the class from them: near chance, the input carries no storage cue the
audit can see; near 1.0, the model could learn the source instead of the tumour.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import cv2
import numpy as np

from .confounds import audit_properties
from .decode import place_pair, read_pair
from .geometry import find_head
from .index import Sample
from .naming import CLASS_NAMES
from .transforms import inference_transform

INPUT_PROPERTIES = ("input_mean", "input_std", "background_share", "head_row", "head_col", "head_height",
                    "head_width", "head_area", "border_mean", "border_std", "high_frequency")
BORDER = 0.05  # share of the side that makes the border frame


def input_statistics(image: np.ndarray, placed: np.ndarray) -> list[float]:
    """`INPUT_PROPERTIES` of one model input: `image` the normalised (S, S) float channel, `placed` the uint8
    (S, S) image before normalisation (where the head is found). Positions and sizes are fractions of S; the
    background share counts pixels within 2 % of the input's range above its minimum; high-frequency energy is
    the mean squared Laplacian over the variance (unchanged by any gain or offset of the input)."""
    size = image.shape[0]
    low, high = float(image.min()), float(image.max())
    background = float(np.mean(image <= low + 0.02 * (high - low))) if high > low else 1.0
    head = find_head(placed)
    if head is None:
        position = [0.5, 0.5, 0.0, 0.0, 0.0]
    else:
        rows, cols = np.flatnonzero(head.any(1)), np.flatnonzero(head.any(0))
        centre = np.argwhere(head).mean(0) / size
        position = [float(centre[0]), float(centre[1]), (rows[-1] + 1 - rows[0]) / size,
                    (cols[-1] + 1 - cols[0]) / size, float(head.mean())]
    frame = max(1, round(BORDER * size))
    border = np.concatenate([image[:frame].ravel(), image[-frame:].ravel(), image[:, :frame].ravel(),
                             image[:, -frame:].ravel()])
    variance = float(image.var())
    laplacian = cv2.Laplacian(image.astype(np.float32), cv2.CV_32F)
    high_frequency = float(np.mean(laplacian.astype(np.float64) ** 2) / variance) if variance > 0 else 0.0
    return [float(image.mean()), float(image.std()), background, *position, float(border.mean()),
            float(border.std()), high_frequency]


def input_table(samples: Sequence[Sample], data_cfg, workers: Optional[int] = None) -> tuple[np.ndarray, int]:
    """(N, len(INPUT_PROPERTIES)) statistics of every sample's model input under `data_cfg` (a DataConfig), and
    how many images fell back from head to letterbox."""
    prep = data_cfg.preprocess
    transform = inference_transform(prep)
    size, mode, margin = prep.image_size, prep.resize, prep.head_margin

    def one(sample: Sample) -> tuple[list[float], bool]:
        placed, mask, placement = place_pair(*read_pair(sample), size, mode, margin)
        image, _ = transform(placed, mask)
        return input_statistics(image[0].numpy(), placed), placement.fallback

    n_workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(n_workers) as pool:
        rows = list(pool.map(one, samples))
    return np.asarray([r[0] for r in rows], dtype=np.float64), sum(r[1] for r in rows)


def subsample(samples: Sequence[Sample], limit: Optional[int], seed: int = 0) -> list[Sample]:
    """At most `limit` samples, drawn per class in proportion (seeded); all of them when `limit` is None."""
    if limit is None or limit >= len(samples):
        return list(samples)
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in samples])
    keep: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep += rng.choice(members, max(1, round(limit * len(members) / len(samples))), replace=False).tolist()
    return [samples[i] for i in sorted(keep)]


def input_audit(samples: Sequence[Sample], data_cfg, folds: int = 5, seed: int = 0,
                workers: Optional[int] = None) -> dict:
    """`confounds.audit_properties` on the input statistics of `samples`, class names as keys."""
    features, fallbacks = input_table(samples, data_cfg, workers)
    result = audit_properties(features, [s.label for s in samples], names=INPUT_PROPERTIES, folds=folds, seed=seed)
    for key in ("recall_per_class", "one_vs_rest"):
        result[key] = {CLASS_NAMES[c]: r for c, r in result[key].items()}
    result["per_property_one_vs_rest"] = {name: {CLASS_NAMES[c]: r for c, r in per_class.items()}
                                          for name, per_class in result["per_property_one_vs_rest"].items()}
    prep = data_cfg.preprocess
    result.update(resize=prep.resize, image_size=prep.image_size, intensity_norm=prep.intensity_norm,
                  head_fallbacks=int(fallbacks))
    return result


def render_input_audit(result: dict) -> str:
    """Console summary of `input_audit`."""
    lines = [f"model-input audit ({result['images']} images, data.preprocess.resize {result['resize']}, "
             f"{result['image_size']} px, {result['intensity_norm']}; {result['folds']}-fold stratified CV, "
             f"balanced accuracy, chance {result['chance']:.2f}):",
             f"  all statistics: {result['balanced_accuracy']:.3f}",
             "  one class against the rest: " + ", ".join(f"{k} {v:.3f}" for k, v in result["one_vs_rest"].items()),
             "  each statistic alone: 4 classes | each class against the rest"]
    ranked = sorted(result["per_property"].items(), key=lambda kv: -kv[1])
    lines += [f"    {name:16s} {value:.3f} | " + " ".join(f"{v:.3f}" for v in
                                                      result["per_property_one_vs_rest"][name].values())
              for name, value in ranked]
    if result["resize"] == "head":
        lines.append(f"  head not found (letterboxed instead): {result['head_fallbacks']} image(s)")
    return "\n".join(lines)
