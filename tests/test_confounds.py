"""Source-confound audit: trivial file/image properties against the class."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from datasets.confounds import PROPERTIES, confound_audit, image_properties, jpeg_channels, jpeg_quality
from datasets.naming import CLASS_NAMES, format_name

PER_CLASS = 24


def _layout(root: Path, shape_of) -> Path:
    """A train split of smooth random images; `shape_of(label, k, rng)` gives each file's (height, width)."""
    rng = np.random.default_rng(0)
    index = 1
    for label, name in enumerate(CLASS_NAMES):
        folder = root / "classification_task" / "train" / name
        folder.mkdir(parents=True)
        for k in range(PER_CLASS):
            h, w = shape_of(label, k, rng)
            image = cv2.resize(rng.uniform(0, 255, (5, 5)).astype(np.float32), (w, h)).clip(0, 255).astype(np.uint8)
            pixels = image if rng.random() < 0.5 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
            stem = format_name("train", index, label, "ax")
            cv2.imwrite(str(folder / f"{stem}.jpg"), pixels, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(85, 96))])
            index += 1
    return root


def _square(label, k, rng):
    side = int(rng.choice([48, 56, 64, 72]))
    return side, side


def test_jpeg_header_properties(tmp_path):
    path = tmp_path / "a.jpg"
    cv2.imwrite(str(path), np.full((40, 60, 3), 90, np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 75])
    assert jpeg_channels(path) == 3 and abs(jpeg_quality(path) - 75) <= 1
    props = dict(zip(PROPERTIES, image_properties(path)))
    assert props["width"] == 60 and props["height"] == 40 and props["aspect"] == 1.5
    assert abs(props["mean_intensity"] - 90) <= 1 and abs(props["background"] - 90) <= 1
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((8, 8), np.uint8))
    assert jpeg_quality(tmp_path / "b.png") == 0 and jpeg_channels(tmp_path / "b.png") == 0


def test_no_confound_scores_about_chance(tmp_path):
    result = confound_audit(_layout(tmp_path, _square))
    assert abs(result["balanced_accuracy"] - 0.25) < 0.15
    assert all(v < 0.7 for v in result["one_vs_rest"].values())


def test_a_non_square_class_is_given_away(tmp_path):
    def shape(label, k, rng):
        h, w = _square(label, k, rng)
        return (h, int(w * rng.uniform(1.3, 1.8))) if label == 2 else (h, w)

    result = confound_audit(_layout(tmp_path, shape))
    assert result["one_vs_rest"]["no_tumor"] > 0.95 and result["recall_per_class"]["no_tumor"] > 0.95
    assert result["per_property_one_vs_rest"]["aspect"]["no_tumor"] > 0.95  # the property that gives it away
    assert result["per_property_one_vs_rest"]["mean_intensity"]["no_tumor"] < 0.8


def test_class_specific_shapes_read_the_labels(tmp_path):
    root = _layout(tmp_path, lambda label, k, rng: (48, 48 + 24 * label + int(rng.integers(0, 4))))
    result = confound_audit(root)
    assert result["balanced_accuracy"] > 0.95 and result["per_property"]["width"] > 0.95
