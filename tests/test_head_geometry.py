"""Head placement (data.preprocess.resize: head): finding the head, the round trip back to the original frame, invariance
to the file's canvas, the letterbox fallback, the cache key and inference."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datasets.cache import cache_key, decode_settings, geometry_settings
from datasets.decode import load_sample, place_pair, to_square
from datasets.geometry import DEFAULT_HEAD_MARGIN, Placement, find_head, head_box, logits_to_original, place
from datasets.index import Sample
from datasets.transforms import prepare_for_inference
from utils.config import ConfigError, DataConfig, PreprocessConfig, load_config


def _head(height: int = 90, width: int = 70, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic head: a textured ellipse with a dark ventricle (a hole) and a bright tumour, and its mask."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width), np.uint8)
    cv2.ellipse(image, (width // 2, height // 2), (width // 2 - 2, height // 2 - 2), 0, 0, 360, 120, -1)
    image = np.clip(image.astype(int) + rng.integers(-15, 15, image.shape) * (image > 0), 0, 255).astype(np.uint8)
    cv2.ellipse(image, (width // 2, height // 2), (6, 10), 0, 0, 360, 0, -1)  # a black ventricle inside
    mask = np.zeros_like(image)
    cv2.circle(mask, (width // 3, height // 3), 9, 255, -1)
    image[mask > 0] = 220
    return image, mask


def _paste(part: np.ndarray, canvas_hw: tuple[int, int], top: int, left: int) -> np.ndarray:
    canvas = np.zeros(canvas_hw, np.uint8)
    canvas[top:top + part.shape[0], left:left + part.shape[1]] = part
    return canvas


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def _logits(square_mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(square_mask > 0, 10.0, -10.0).astype(np.float32))[None, None]


def test_find_head_fills_holes_and_ignores_specks():
    image, _ = _head()
    canvas = _paste(image, (120, 160), 10, 30)
    canvas[2:4, 2:4] = 255  # a bright speck: another, smaller component
    head = find_head(canvas)
    assert head is not None and head[10 + 45, 30 + 35]  # the ventricle (black inside) is part of the head
    assert not head[2, 2]
    rows, cols = np.flatnonzero(head.any(1)), np.flatnonzero(head.any(0))
    extent = np.array([rows[0], rows[-1], cols[0], cols[-1]])
    ellipse = np.argwhere(canvas[5:] > 0) + [5, 0]
    truth = np.array([ellipse[:, 0].min(), ellipse[:, 0].max(), ellipse[:, 1].min(), ellipse[:, 1].max()])
    assert np.abs(extent - truth).max() <= 1  # the ellipse's own extent, up to the 5x5 blur
    # head box: the longer side grown by 10 % on each side, centred on the extent (twice the centre is exact)
    side = round((rows[-1] + 1 - rows[0]) * 1.2)
    assert head_box(canvas, 0.1) == ((rows[0] + rows[-1] + 1 - side) // 2, (cols[0] + cols[-1] + 1 - side) // 2, side)


@pytest.mark.parametrize("canvas_hw,offset", [((90, 70), (0, 0)), ((200, 120), (50, 20)), ((100, 300), (5, 200))])
def test_head_round_trip_of_a_mask(canvas_hw, offset):
    image, mask = _head()
    image, mask = _paste(image, canvas_hw, *offset), _paste(mask, canvas_hw, *offset)
    square_image, square_mask, placement = place_pair(image, mask, 64, "head", 0.1)
    assert placement.mode == "head" and not placement.fallback and square_image.shape == (64, 64)
    back = logits_to_original(_logits(square_mask), canvas_hw, placement)[0, 0].numpy() > 0
    assert back.shape == canvas_hw
    assert _dice(back, mask > 0) > 0.95
    assert not back[mask == 0][np.argwhere(mask == 0)[:, 0] < offset[0]].any()  # nothing above the head


def test_head_round_trip_is_exact_when_the_square_is_the_model_size():
    image, mask = _head(90, 70)
    canvas, canvas_mask = _paste(image, (150, 260), 30, 100), _paste(mask, (150, 260), 30, 100)
    placement = place(canvas, 100, "head", 0.0)
    size = placement.box[2]  # side of the head square: no resampling either way
    square_mask = to_square(canvas_mask, size, placement, is_mask=True)
    back = logits_to_original(_logits(square_mask), canvas.shape, place(canvas, size, "head", 0.0))[0, 0].numpy()
    assert np.array_equal(back > 0, canvas_mask > 0)


def test_the_same_head_on_other_canvases_gives_the_same_input():
    image, _ = _head(100, 80)
    reference = to_square(_paste(image, (100, 80), 0, 0), 64, "head", margin=0.1).astype(float)
    for canvas_hw, offset in [((256, 256), (100, 30)), ((120, 300), (10, 200)), ((400, 100), (250, 10))]:
        other = to_square(_paste(image, canvas_hw, *offset), 64, "head", margin=0.1).astype(float)
        assert np.abs(other - reference).max() == 0  # integer moves of the head move its square alike
    # the same head at another resolution (a larger file of the same slice): equal up to resampling
    larger = cv2.resize(image, (160, 200), interpolation=cv2.INTER_LINEAR)
    other = to_square(_paste(larger, (300, 500), 40, 300), 64, "head", margin=0.1).astype(float)
    assert np.abs(other - reference).mean() < 6.0  # grey levels, of 0..255
    letterboxed = [to_square(_paste(image, hw, *o), 64, "letterbox").astype(float)
                   for hw, o in [((100, 80), (0, 0)), ((120, 300), (10, 200))]]
    assert np.abs(letterboxed[0] - letterboxed[1]).mean() > 20  # what the head mode removes


def test_an_empty_image_falls_back_to_letterbox():
    empty = np.zeros((50, 80), np.uint8)
    placement = place(empty, 32, "head")
    assert placement == Placement("letterbox", (50, 80), 32, fallback=True)
    assert np.array_equal(to_square(empty, 32, placement), to_square(empty, 32, "letterbox"))
    flat = np.full((50, 80), 90, np.uint8)
    assert place(flat, 32, "head").fallback
    back = logits_to_original(torch.zeros(1, 1, 32, 32), (50, 80), placement)
    assert back.shape == (1, 1, 50, 80)


def test_head_needs_a_placement_to_map_back_and_a_mask_needs_its_image():
    with pytest.raises(ValueError, match="Placement"):
        logits_to_original(torch.zeros(1, 1, 8, 8), (10, 10), "head")
    with pytest.raises(ValueError, match="Placement"):
        to_square(np.zeros((40, 40), np.uint8), 16, "head", is_mask=True)
    placement = place(_head()[0], 16, "head")
    with pytest.raises(ValueError, match="placement"):
        logits_to_original(torch.zeros(1, 1, 16, 16), (10, 10), placement)


def test_config_cache_key_and_inference_know_head(tmp_path: Path):
    image, mask = _head()
    canvas, canvas_mask = _paste(image, (100, 180), 5, 90), _paste(mask, (100, 180), 5, 90)
    cv2.imwrite(str(tmp_path / "img.png"), canvas)
    cv2.imwrite(str(tmp_path / "mask.png"), canvas_mask)
    sample = Sample("s", 0, "ax", tmp_path / "img.png", tmp_path / "mask.png")
    keys = {cache_key([sample], decode_settings(64, geometry_settings(mode, margin)))
            for mode, margin in [("head", 0.05), ("head", 0.1), ("letterbox", 0.05), ("letterbox", 0.1)]}
    assert len(keys) == 3  # the margin only matters for head
    cfg = DataConfig(preprocess=PreprocessConfig(image_size=64, resize="head", head_margin=0.1, in_channels=1, mean=[0.0],
                                            std=[1.0]))
    tensor, placement = prepare_for_inference(sample.image, cfg)
    assert placement.mode == "head" and placement.original_hw == (100, 180)
    loaded_image, loaded_mask = load_sample(sample, 64, "head", 0.1)
    assert torch.allclose(tensor[0], torch.from_numpy(loaded_image / 255.0).float())
    back = logits_to_original(_logits(loaded_mask), placement.original_hw, placement)[0, 0].numpy() > 0
    assert _dice(back, canvas_mask > 0) > 0.95
    with pytest.raises(ConfigError, match="head_margin"):
        load_config(None, ["data.preprocess.head_margin=1.5"])
    assert DataConfig().preprocess.head_margin == DEFAULT_HEAD_MARGIN  # one default for the config and the functions
