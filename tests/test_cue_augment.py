"""Augmentations against storage cues (JPEG, resampling, random canvas, sharpen, posterize), the held-out shifts of
the benchmark and which augmentation imitates which shift; the head/cue configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.mri_shifts import (HELD_OUT, SHIFT_NAMES, apply_shift, ghosting, imitated_by, kspace_truncation,
                                 match_histogram)
from datasets.transforms import RandomCanvas, train_pipeline
from utils.config import AugmentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def _slice(size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    head = (xx / 0.8) ** 2 + (yy / 0.9) ** 2 <= 1
    return np.where(head, 100 + 40 * np.sin(5 * xx), 0).astype(np.uint8)


def test_random_canvas_changes_the_aspect_ratio_within_range_and_moves_the_mask_alike():
    image = _slice(80)[:, :60]
    mask = np.zeros_like(image)
    mask[30:40, 20:30] = 255
    canvas = RandomCanvas(1.0, (0.5, 2.0))
    torch.manual_seed(3)
    ratios, pads, crops = [], 0, 0
    for _ in range(60):
        assert canvas.fires()
        out, out_mask = canvas(image, mask)
        assert out.shape == out_mask.shape
        ratios.append(out.shape[1] / out.shape[0])
        if out.size > image.size:
            pads += 1
            assert np.count_nonzero(out_mask) == 100
        else:
            crops += 1
    assert 0.5 - 0.05 <= min(ratios) and max(ratios) <= 2.0 + 0.05 and np.std(np.log(ratios)) > 0.2
    assert pads > 10 and crops > 10
    never = RandomCanvas(0.0)
    assert not any(never.fires() for _ in range(20))


def test_cue_augmentations_are_switches_with_probabilities():
    off = train_pipeline(32, AugmentConfig())
    on = train_pipeline(32, AugmentConfig(p_jpeg=1.0, p_resample=0.5, p_sharpen=0.2, p_posterize=0.1))
    names = [type(t).__name__ for t in on.transforms]
    assert {"ImageCompression", "Downscale", "Sharpen", "Posterize"} <= set(names)
    assert not {"ImageCompression", "Downscale", "Sharpen", "Posterize"} & {type(t).__name__ for t in off.transforms}
    jpeg = next(t for t in on.transforms if type(t).__name__ == "ImageCompression")
    assert jpeg.p == 1.0
    image = _slice(32)
    out = on(image=image, mask=np.zeros_like(image))["image"]
    assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)


def test_ghosting_puts_a_copy_half_a_field_of_view_away():
    image = np.zeros((64, 64), np.uint8)
    image[8:24, 24:40] = 200  # a block in the top half
    ghosted = ghosting(image, 1.0).astype(float)
    assert ghosted[40:56, 24:40].mean() > 0.3 * 200 * np.sin(0.5)  # the ghost: rows + 32
    assert ghosted[40:56, :16].max() < 5 and ghosted[40:56, 24:40].mean() < 200
    # the phase error leaves the even k-space rows: at phase 2*pi nothing changes
    assert np.abs(ghosting(image, 2 * np.pi).astype(int) - image).max() <= 1


def test_kspace_truncation_blurs_along_rows_only():
    image = np.zeros((64, 64), np.uint8)
    image[:, 32:] = 200  # a vertical edge: constant along the rows' axis
    assert np.abs(kspace_truncation(image, 0.25).astype(int) - image).max() <= 1
    horizontal = image.T.copy()  # a horizontal edge rings
    assert np.abs(kspace_truncation(horizontal, 0.25).astype(int) - horizontal).max() > 20


def test_histogram_match_against_a_reference_cdf():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 100, (64, 64)).astype(np.uint8)
    reference = rng.integers(150, 250, (64, 64)).astype(np.uint8)
    matched = match_histogram(image, reference)
    assert 140 <= matched.min() and matched.max() <= 250
    assert abs(np.median(matched) - np.median(reference)) <= 3
    order = np.argsort(image, axis=None)
    assert np.all(np.diff(matched.reshape(-1)[order].astype(int)) >= 0)  # monotone: no contrast inversion
    given = apply_shift("histogram_match", 3, image, np.zeros_like(image), "a", references=[reference])[0]
    assert np.array_equal(given, matched)


def test_every_shift_says_what_imitates_it():
    assert set(HELD_OUT) == {"ghosting", "kspace_truncation", "histogram_match"}
    assert imitated_by("low_resolution") == ["p_low_resolution", "p_resample", "p_blur"]
    cfg = load_config(ROOT / "configs/brisc_cpu_head_robust.yaml").data.augment
    assert imitated_by("low_resolution", cfg) == ["p_low_resolution", "p_resample"]
    assert imitated_by("contrast", cfg) == ["p_brightness_contrast"]
    assert all(imitated_by(name, cfg) == [] for name in HELD_OUT)
    assert all(isinstance(imitated_by(name), list) for name in SHIFT_NAMES)
    with pytest.raises(ValueError, match="unknown shift"):
        imitated_by("blur")


def test_head_configs_add_to_the_recipes_and_leave_them_unchanged():
    plain, robust = load_config(ROOT / "configs/brisc_cpu_stretch.yaml"), load_config(ROOT / "configs/brisc_cpu_robust.yaml")
    head, head_robust = (load_config(ROOT / f"configs/{n}.yaml") for n in ("brisc_cpu_head", "brisc_cpu_head_robust"))
    assert plain.data.preprocess.resize == "stretch" and plain.data.augment.p_canvas == 0 and plain.data.augment.p_jpeg == 0
    assert head.data.preprocess.resize == head_robust.data.preprocess.resize == "head"
    assert head.data.augment.p_canvas > 0 and head_robust.data.augment.p_jpeg > 0
    assert head_robust.data.preprocess.intensity_norm == robust.data.preprocess.intensity_norm == "zscore"
    assert head_robust.data.augment.p_bias_field == robust.data.augment.p_bias_field > 0
    assert head.optim == plain.optim and head.train == plain.train and head.model == plain.model


def test_dataset_with_head_geometry_and_a_random_canvas(tiny_brisc, tmp_path):
    from datasets.brisc import BriscDataset

    aug = AugmentConfig(p_hflip=0.0, p_rotate=0.0, p_shift_scale=0.0, p_brightness_contrast=0.0, p_noise=0.0,
                        p_canvas=1.0)
    ds = BriscDataset(tiny_brisc, "train", image_size=32, train=True, augment=aug, resize="head", cache="ram",
                      verbose=False, head_margin=0.1)
    plain = BriscDataset(tiny_brisc, "train", image_size=32, train=False, resize="head", verbose=False)
    torch.manual_seed(0)
    item, reference = ds[0], plain[0]
    assert item["image"].shape == reference["image"].shape == (3, 32, 32)
    assert ds.placement(0).mode in ("head", "letterbox") and ds.placement(0).original_hw == plain.placement(0).original_hw
    assert ds.placement(ds.stems[0]) is ds.placement(0)
    assert ds.head_fallbacks() == [] and BriscDataset(tiny_brisc, "test", image_size=32, verbose=False).head_fallbacks() == []
