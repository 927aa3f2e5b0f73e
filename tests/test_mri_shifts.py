"""MRI acquisition shifts (datasets/mri_shifts.py), their use as augmentation, per-image intensity standardisation."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from datasets.mri_shifts import (SHIFT_NAMES, MriShiftAugment, apply_shift, bias_field, draw_params, gamma_curve,
                                 severity_params, window)
from datasets.transforms import SampleTransform, eval_pipeline, standardise, train_pipeline
from utils.config import AugmentConfig, ConfigError, load_config


def _slice(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A head-like test slice: a textured bright ellipse on a dark background, an off-centre bright tumour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    head = (xx / 0.8) ** 2 + (yy / 0.9) ** 2 <= 1
    image = np.where(head, 90 + 30 * np.sin(6 * xx) * np.cos(4 * yy), 3) + rng.normal(0, 2, (size, size))
    tumour = (xx - 0.35) ** 2 + (yy + 0.3) ** 2 <= 0.04
    image[tumour] = 170
    return np.clip(image, 0, 255).astype(np.uint8), tumour.astype(np.uint8) * 255


@pytest.mark.parametrize("name", SHIFT_NAMES)
def test_shift_is_identity_at_severity_zero_and_deterministic(name):
    image, mask = _slice()
    out, out_mask = apply_shift(name, 0, image, mask, "img_1", seed=5)
    assert np.array_equal(out, image) and np.array_equal(out_mask, mask)
    # The parameters at severity 0 are the identity too (augmentation draws severities near 0).
    params = draw_params(name, 0.0, np.random.default_rng(0))
    aug = MriShiftAugment(name, (0.0, 0.0), p=1.0)
    assert np.array_equal(aug.apply(image, shift_params=params), image)
    assert np.array_equal(aug.apply_to_mask(mask, shift_params=params), mask)

    first = apply_shift(name, 2, image, mask, "img_1", seed=5)
    again = apply_shift(name, 2, image, mask, "img_1", seed=5)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[0].dtype == np.uint8 and first[0].shape == image.shape


@pytest.mark.parametrize("name", SHIFT_NAMES)
def test_shift_grows_with_severity(name):
    image, mask = _slice()
    changes = [np.abs(apply_shift(name, s, image, mask, "a")[0].astype(float) - image).mean() for s in (1, 2, 3)]
    assert 0 < changes[0] < changes[1] < changes[2], changes


def test_random_shifts_depend_on_seed_and_image_only():
    image, mask = _slice()
    for name in ("bias_field", "noise"):
        a = apply_shift(name, 2, image, mask, "a", seed=0)[0]
        assert not np.array_equal(a, apply_shift(name, 2, image, mask, "a", seed=1)[0])
        assert not np.array_equal(a, apply_shift(name, 2, image, mask, "b", seed=0)[0])


def test_shift_formulas_against_hand_computation():
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert gamma_curve(ramp, 2.0)[8, 0] == round(255 * (128 / 255) ** 2)  # 64
    windowed = window(ramp, 20, 185).ravel()  # windowed[v] is grey level v after the window
    assert windowed[:21].max() == 0 and windowed[185:].min() == 255
    assert windowed[102] == round((102 - 20) * 255 / 165)
    p = severity_params("gamma", 1.5)  # halfway between the anchors 1.3 and 1.6
    assert p["gamma"] == pytest.approx(1.45)
    # Bias field: exp of a polynomial without constant term; c = 0 gives exactly 1; x^1 term only gives exp(c x).
    assert np.array_equal(bias_field((8, 8), np.zeros(9)), np.ones((8, 8)))
    coeffs = np.zeros(9)
    terms = [(i, j) for i in range(4) for j in range(4 - i) if i + j > 0]
    coeffs[terms.index((0, 1))] = 0.5  # c * x^0 * y^1
    field = bias_field((5, 5), coeffs)
    assert field[0, 2] == pytest.approx(np.exp(-0.5)) and field[4, 2] == pytest.approx(np.exp(0.5))
    # Rician noise on a zero background is Rayleigh distributed: mean sigma * sqrt(pi / 2).
    zeros = np.zeros((200, 200), np.uint8)
    noisy = apply_shift("noise", 3, zeros, zeros, "bg")[0]
    assert noisy.mean() == pytest.approx(14 * np.sqrt(np.pi / 2), rel=0.05)


def test_rotate_zoom_moves_the_mask_with_the_image():
    image, mask = _slice()
    image = mask.copy()  # the image is the mask: they must stay on top of each other
    out, out_mask = apply_shift("rotate_zoom", 3, image, mask, "x")
    assert not np.array_equal(out_mask, mask)
    inter = ((out >= 128) & (out_mask > 0)).sum()
    union = ((out >= 128) | (out_mask > 0)).sum()
    assert inter / union > 0.9
    assert set(np.unique(out_mask)) <= {0, 255}


def test_augmentation_keeps_masks_aligned_and_is_reproducible():
    aug = AugmentConfig(p_hflip=0.5, p_rotate=1.0, p_shift_scale=1.0, p_mri_rotate_zoom=1.0, p_bias_field=1.0,
                        p_mri_gamma=1.0, p_low_resolution=1.0, p_mri_intensity=1.0, p_mri_contrast=1.0,
                        p_brightness_contrast=0.0, p_noise=0.0, mri_severity=[1.0, 3.0])
    _, mask = _slice(64)
    tumour_like = np.where(mask > 0, 200, 10).astype(np.uint8)
    pipeline = train_pipeline(64, aug)
    names = [type(t).__name__ for t in pipeline.transforms]
    assert names.count("MriShiftAugment") == 6
    overlaps = []
    for seed in range(6):
        pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = pipeline(image=tumour_like, mask=mask)
        pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        again = pipeline(image=tumour_like, mask=mask)
        assert np.array_equal(out["image"], again["image"]) and np.array_equal(out["mask"], again["mask"])
        moved = out["mask"] > 0
        assert moved.sum() > 0 and not np.array_equal(moved, mask > 0)
        # intensity shifts keep the order of grey levels: the bright tumour is still the brightest region
        bright = out["image"] >= np.percentile(out["image"], 100 * (1 - moved.mean()))
        overlaps.append((bright & moved).sum() / (bright | moved).sum())
    assert min(overlaps) > 0.6, overlaps


def _transform(norm: str) -> SampleTransform:
    return SampleTransform(eval_pipeline(48), in_channels=3, intensity_norm=norm)


@pytest.mark.parametrize("norm", ["zscore", "percentile"])
def test_standardisation_maps_a_scaled_image_to_the_same_input(norm):
    image, mask = _slice(48)
    dim = (image // 2).astype(np.uint8)  # <= 127, so 2 * dim is exact in uint8
    bright = (dim * 2).astype(np.uint8)
    a, _ = _transform(norm)(dim, mask)
    b, _ = _transform(norm)(bright, mask)
    assert a.shape == (3, 48, 48)
    assert torch.allclose(a, b, atol=1e-5)
    # the fixed ImageNet statistics do not have this property
    a, _ = _transform("imagenet")(dim, mask)
    b, _ = _transform("imagenet")(bright, mask)
    assert not torch.allclose(a, b, atol=1e-2)


def test_zscore_standardises_the_head():
    image, _ = _slice(48)
    grey = torch.from_numpy(image).float()[None]
    z = standardise(grey, "zscore")
    head = grey > grey.mean()
    assert z[head].mean().item() == pytest.approx(0.0, abs=1e-5)
    assert z[head].std().item() == pytest.approx(1.0, abs=1e-4)
    p = standardise(grey, "percentile", (0.0, 100.0))
    assert p.min().item() == 0.0 and p.max().item() == pytest.approx(255.0)


def test_config_keys_for_the_levers():
    cfg = load_config("configs/demo.yaml", ["data.preprocess.intensity_norm=percentile", "data.augment.p_bias_field=0.3",
                                            "data.augment.mri_severity=[0.5,2.5]"])
    assert cfg.data.preprocess.intensity_norm == "percentile" and cfg.data.augment.p_bias_field == 0.3
    with pytest.raises(ConfigError, match="intensity_norm"):
        load_config(None, ["data.preprocess.intensity_norm=minmax"])
    with pytest.raises(ConfigError, match="mri_severity"):
        load_config(None, ["data.augment.mri_severity=[0,4]"])
    with pytest.raises(ConfigError, match="percentile_range"):
        load_config(None, ["data.preprocess.percentile_range=[99,1]"])


def test_standardisation_reaches_every_input_path(tmp_path, tiny_brisc):
    """The dataset (train.py, test.py) and the folder path (test.py --input) both use data.preprocess.intensity_norm."""
    import cv2

    from datasets.factory import build_eval_dataset
    from datasets.transforms import load_image_for_inference

    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_brisc}", "data.generated.enabled=false", "data.preprocess.image_size=48",
                                            "data.loader.cache=none", "data.preprocess.intensity_norm=zscore"])
    image, _ = _slice(48)  # at the model's size: resizing would round the two images differently
    dim = (image // 2).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "dim.png"), dim)
    cv2.imwrite(str(tmp_path / "bright.png"), (dim * 2).astype(np.uint8))
    a, size = load_image_for_inference(tmp_path / "dim.png", cfg.data)
    b, _ = load_image_for_inference(tmp_path / "bright.png", cfg.data)
    assert size == (48, 48) and torch.allclose(a, b, atol=1e-5)

    item = build_eval_dataset(cfg.data, "test", verbose=False)[0]["image"][0]
    head = item > item.mean()
    assert item[head].mean().item() == pytest.approx(0.0, abs=1e-4)
