"""Letterbox placement: decoding, the disk-cache key and the way back to the original frame."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datasets.cache import cache_key, decode_settings
from datasets.decode import load_sample, to_square
from datasets.geometry import letterbox_box, logits_to_original
from datasets.index import Sample
from datasets.transforms import load_image_for_inference
from utils.config import DataConfig, PreprocessConfig


def _logits(square_mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(square_mask > 0, 10.0, -10.0).astype(np.float32))[None, None]


def test_letterbox_box_centres_the_scaled_image():
    assert letterbox_box((100, 200), 50) == (12, 0, 25, 50)
    assert letterbox_box((200, 100), 50) == (0, 12, 50, 25)
    assert letterbox_box((64, 64), 32) == (0, 0, 32, 32)
    assert letterbox_box((1000, 3), 64) == (0, 31, 64, 1)  # never a zero-width box


def test_letterbox_round_trips_a_mask_exactly_at_the_same_size():
    rng = np.random.default_rng(0)
    mask = np.where(rng.random((64, 40)) > 0.7, np.uint8(255), np.uint8(0))
    square = to_square(mask, 64, "letterbox", is_mask=True)
    assert square.shape == (64, 64)
    assert not square[:, :12].any() and not square[:, 52:].any()  # zero padding left and right
    assert np.array_equal(square[:, 12:52], mask)
    back = logits_to_original(_logits(square), (64, 40), "letterbox")[0, 0] > 0
    assert np.array_equal(back.numpy(), mask > 0)


def test_a_non_square_mask_maps_back_to_its_own_pixels():
    mask = np.zeros((100, 200), np.uint8)
    mask[40:60, 120:160] = 255  # a block on the right half
    square = to_square(mask, 50, "letterbox", is_mask=True)  # scale 1/4, content rows 12..36
    assert np.array_equal(np.argwhere(square)[[0, -1]], [[22, 30], [26, 39]])
    back = logits_to_original(_logits(square), (100, 200), "letterbox")[0, 0].numpy() > 0
    found = np.argwhere(back)
    assert np.array_equal([found.min(0), found.max(0)], [[40, 120], [59, 159]])  # the block's own rows/columns
    assert np.count_nonzero(back != (mask > 0)) == 4  # only the corners, rounded by the bilinear upscaling
    # mapping the same letterboxed logits back as if they were stretched lands elsewhere
    stretched = np.argwhere(logits_to_original(_logits(square), (100, 200), "stretch")[0, 0].numpy() > 0)
    assert (stretched.min(0)[0], stretched.max(0)[0]) == (44, 53)  # rows 22..26 of 50, doubled: not 40..59


def test_stretch_is_unchanged_and_unknown_modes_fail():
    image = np.arange(30 * 20, dtype=np.uint8).reshape(30, 20)
    assert np.array_equal(to_square(image, 16, "stretch"), cv2.resize(image, (16, 16), interpolation=cv2.INTER_AREA))
    with pytest.raises(ValueError, match="resize mode"):
        to_square(image, 16, "crop")


def _pair(tmp_path: Path) -> Sample:
    image = np.full((60, 120), 200, np.uint8)
    mask = np.zeros((60, 120), np.uint8)
    mask[10:30, 80:110] = 255
    cv2.imwrite(str(tmp_path / "img.png"), image)
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    return Sample("s", 0, "ax", tmp_path / "img.png", tmp_path / "mask.png")


def test_load_sample_pads_image_and_mask_alike(tmp_path):
    sample = _pair(tmp_path)
    image, mask = load_sample(sample, 60, "letterbox")  # scale 1/2: rows 15..44 hold the content
    assert (image[:15] == 0).all() and (image[45:] == 0).all() and (image[15:45] == 200).all()
    assert np.array_equal(np.argwhere(mask)[[0, -1]], [[20, 40], [29, 54]])
    stretched_image, _ = load_sample(sample, 60, "stretch")
    assert (stretched_image == 200).all()


def test_cache_key_and_inference_follow_the_resize_mode(tmp_path):
    sample = _pair(tmp_path)
    assert (cache_key([sample], decode_settings(64, {"resize": "letterbox"}))
            != cache_key([sample], decode_settings(64, {"resize": "stretch"})))
    cfg = DataConfig(preprocess=PreprocessConfig(image_size=60, resize="letterbox", in_channels=1, mean=[0.0], std=[1.0]))
    tensor, original = load_image_for_inference(sample.image, cfg)
    assert original == (120, 60) and tensor.shape == (1, 60, 60)
    assert torch.allclose(tensor[0], torch.from_numpy(load_sample(sample, 60, "letterbox")[0] / 255.0).float())
