"""The audit of the model's inputs (datasets/input_confounds.py): near chance without a planted cue, near 1.0 with
one, and a canvas cue that stretch hands to the model and head geometry removes."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.index import Sample
from datasets.input_confounds import INPUT_PROPERTIES, input_audit, input_statistics, subsample
from utils.config import DataConfig, PreprocessConfig


def _write(root: Path, per_class: int, canvas_cue: bool = False, bright_cue: bool = False) -> list[Sample]:
    """Heads drawn alike for every class; class 2 (no_tumor) optionally on wide canvases or brighter."""
    rng = np.random.default_rng(1)
    samples = []
    for label in range(4):
        for k in range(per_class):
            head = np.zeros((80, 80), np.uint8)
            axes = (int(rng.integers(28, 36)), int(rng.integers(30, 38)))
            level = int(rng.integers(90, 140)) + (60 if bright_cue and label == 2 else 0)
            cv2.ellipse(head, (40, 40), axes, float(rng.uniform(-10, 10)), 0, 360, level, -1)
            head = np.clip(head + rng.normal(0, 6, head.shape) * (head > 0), 0, 255).astype(np.uint8)
            extra = int(rng.integers(30, 60)) if canvas_cue and label == 2 else 0
            left = int(rng.integers(0, extra + 1))
            canvas = np.zeros((80, 80 + extra), np.uint8)
            canvas[:, left:left + 80] = head
            path = root / f"img_{label}_{k}.png"
            cv2.imwrite(str(path), canvas)
            samples.append(Sample(f"img_{label}_{k}", label, "ax", path, None))
    return samples


def _cfg(resize: str) -> DataConfig:
    return DataConfig(preprocess=PreprocessConfig(image_size=64, resize=resize, in_channels=1, mean=[0.5], std=[0.25]))


def test_statistics_of_one_input_by_hand():
    placed = np.zeros((40, 40), np.uint8)
    placed[10:30, 20:40] = 200
    image = placed / 255.0
    stats = dict(zip(INPUT_PROPERTIES, input_statistics(image, placed)))
    assert stats["input_mean"] == pytest.approx(image.mean()) and stats["input_std"] == pytest.approx(image.std())
    assert stats["background_share"] == pytest.approx(0.75)
    assert stats["head_row"] == pytest.approx(19.5 / 40) and stats["head_col"] == pytest.approx(29.5 / 40, abs=0.02)
    assert stats["head_height"] == pytest.approx(0.5, abs=0.08)  # the 5x5 blur widens by a pixel a side
    assert stats["head_area"] == pytest.approx(0.25, abs=0.05)
    frame = 2  # 5 % of 40
    border = np.concatenate([image[:frame].ravel(), image[-frame:].ravel(), image[:, :frame].ravel(),
                             image[:, -frame:].ravel()])
    assert stats["border_mean"] == pytest.approx(border.mean())
    lap = cv2.Laplacian(image.astype(np.float32), cv2.CV_32F).astype(float)
    assert stats["high_frequency"] == pytest.approx(np.mean(lap ** 2) / image.var(), rel=1e-5)


def test_near_chance_without_a_cue_and_near_one_with_a_brightness_cue(tmp_path):
    (tmp_path / "a").mkdir()
    clean = input_audit(_write(tmp_path / "a", 30), _cfg("stretch"), workers=1)
    assert clean["balanced_accuracy"] < 0.45 and clean["one_vs_rest"]["no_tumor"] < 0.7
    (tmp_path / "b").mkdir()
    cued = input_audit(_write(tmp_path / "b", 30, bright_cue=True), _cfg("head"), workers=1)
    assert cued["one_vs_rest"]["no_tumor"] > 0.95 and cued["head_fallbacks"] == 0


def test_a_canvas_cue_reaches_stretch_inputs_but_not_head_inputs(tmp_path):
    samples = _write(tmp_path, 30, canvas_cue=True)
    stretched = input_audit(samples, _cfg("stretch"), workers=1)
    letterboxed = input_audit(samples, _cfg("letterbox"), workers=1)
    head = input_audit(samples, _cfg("head"), workers=1)
    assert stretched["one_vs_rest"]["no_tumor"] > 0.95 and letterboxed["one_vs_rest"]["no_tumor"] > 0.95
    assert head["one_vs_rest"]["no_tumor"] < 0.7 and head["balanced_accuracy"] < 0.45


def test_subsample_keeps_class_proportions(tmp_path):
    samples = [Sample(f"s{i}", i % 4 if i < 80 else 0, "ax", tmp_path / f"{i}.png", None) for i in range(100)]
    kept = subsample(samples, 50)
    counts = np.bincount([s.label for s in kept])
    assert abs(len(kept) - 50) <= 2 and counts[0] == 20 and list(counts[1:]) == [10, 10, 10]
    assert subsample(samples, None) == samples and subsample(samples, 50) == kept


def test_check_command_runs_both_audits(tiny_brisc, tmp_path, capsys):
    from datasets.check import main as check_main

    config = tmp_path / "head.yaml"
    config.write_text("data:\n  preprocess:\n    image_size: 32\n    resize: head\n", encoding="utf-8")
    check_main([str(tiny_brisc), "--confounds", "--config", str(config), "--audit-limit", "40", "--workers", "1"])
    out = capsys.readouterr().out
    assert "source-confound audit" in out and "model-input audit (40 images, data.preprocess.resize head, 32 px" in out
    assert "head not found (letterboxed instead): 0 image(s)" in out
    with pytest.raises(SystemExit):
        check_main([str(tiny_brisc), "--config", str(config)])
