"""The web demo's logic (app.py draws the page): checkpoints to offer, example slices, reading an upload,
and what is shown for one prediction (overlay, tumour share of the head, Grad-CAM, the JSON record).

The prediction itself is `prediction.folder.predict_image`, the function `test.py --input` uses, so a slice
gets the same class, probabilities and mask on the page as from the command line.
"""
from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np
import torch
import torch.nn as nn

from datasets.decode import decode_grey_buffer
from datasets.errors import DataError
from datasets.geometry import logits_to_original
from datasets.naming import CLASS_NAMES, format_name
from prediction.folder import ImagePrediction

MAX_PIXELS = 40_000_000  # uploads above 40 megapixels are refused before they are decoded
HEAD_THRESHOLD = 20  # grey level (of 255) above which a pixel counts as head, the denominator of the tumour share
MASK_COLOUR = (255, 40, 40)  # RGB of the tumour overlay
DISPLAY_MAX_SIDE = 1024  # pixels: larger pictures are shrunk for the page only
EXAMPLE_SEED = 17
EXAMPLE_SIZE = (512, 512)  # (height, width), the release's most common size
DEMO_COMMAND = "python train.py --config configs/demo.yaml"


def find_checkpoints(runs_dir: Union[str, Path] = "runs") -> list[Path]:
    """Every `runs/*/latest/best.pth`, newest first (by the file's modification time)."""
    found = [p for p in Path(runs_dir).glob("*/latest/best.pth") if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def ensure_examples(cache_dir: Union[str, Path]) -> dict[str, Path]:
    """One generated BRISC-layout slice per class in `cache_dir` (written once; later calls reuse them)."""
    from datasets.synthetic import render

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    examples = {}
    for label, name in enumerate(CLASS_NAMES):
        path = cache_dir / f"{format_name('test', label + 1, label, 'ax')}.jpg"
        if not path.is_file():
            image, _ = render(np.random.default_rng([EXAMPLE_SEED, label]), label, "ax", EXAMPLE_SIZE)
            ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(encoded.tobytes())
            tmp.replace(path)  # a half-written example is never picked up by another session
        examples[name] = path
    return examples


def read_upload(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An uploaded file as the uint8 greyscale array `test.py --input` would decode from it.

    Raises `DataError` with a message for the page: an empty file, a file that is not an image, an image
    above `max_pixels` (checked from the header, before decoding), a damaged or truncated file (named as
    such, where OpenCV would only say it cannot decode it), an image under 32 px on a side.
    """
    from PIL import Image

    if not data:
        raise DataError(f"'{name}' is empty (0 bytes): upload a JPEG or PNG slice")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise DataError(f"'{name}' is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); "
                                    f"the limit is {max_pixels / 1e6:g} megapixels: downscale it first")
                probe.load()  # decodes everything: a truncated file fails here
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(f"'{name}' is larger than the {max_pixels / 1e6:g}-megapixel limit: downscale it first"
                        ) from None
    except Image.UnidentifiedImageError:
        raise DataError(f"'{name}' is not an image (cannot decode it): upload a JPEG or PNG slice") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"'{name}' is a damaged or truncated image ({exc}): upload the complete file") from None
    return decode_grey_buffer(np.frombuffer(data, np.uint8), name)[0]


def head_mask(grey: np.ndarray, threshold: int = HEAD_THRESHOLD) -> np.ndarray:
    """Pixels brighter than `threshold` (of 255): the head, against the dark background of an MRI slice."""
    return grey > threshold


def tumour_area(mask: np.ndarray, grey: np.ndarray) -> dict:
    """Tumour pixels, head pixels and the tumour's share of the head (None when no pixel is above the threshold)."""
    tumour = mask > 0
    head = int(head_mask(grey).sum())
    share = float((tumour & head_mask(grey)).sum() / head) if head else None
    return {"tumour_pixels": int(tumour.sum()), "head_pixels": head, "tumour_share_of_head": share}


def overlay(grey: np.ndarray, mask: Optional[np.ndarray], opacity: float) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the slice with the tumour mask blended in at `opacity` (0..1)."""
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if mask is not None:
        inside = mask > 0
        rgb[inside] = (1 - opacity) * rgb[inside] + opacity * np.asarray(MASK_COLOUR, np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def for_display(rgb: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """A picture shrunk (area averaging) so that its longest side is at most `max_side`: the page need not send
    a 40-megapixel PNG to the browser (downloads keep the full size)."""
    scale = max_side / max(rgb.shape[:2])
    if scale >= 1:
        return rgb
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def gradcam_view(model: nn.Module, cfg, prediction: ImagePrediction, grey: np.ndarray,
                 target_class: Optional[int] = None) -> np.ndarray:
    """(H, W, 3) uint8 Grad-CAM of `target_class` (default: the predicted one) over the slice at its own size.

    The heat map is computed on the model's input and mapped back with `logits_to_original` through the
    prediction's placement, the same geometry as the mask (zero heat outside a head crop).
    """
    from visualization.gradcam import blend_heatmaps, gradcam_heatmaps

    target = prediction.class_index if target_class is None else int(target_class)
    # Grad-CAM hooks the model's layers, and every forward through a hooked model (another web-demo session's
    # prediction too) fires them: it runs on a private copy (1.4 M parameters, a few MB), so sessions never share hooks
    cam = gradcam_heatmaps(copy.deepcopy(model), prediction.model_input.unsqueeze(0), target_classes=[target])
    width, height = prediction.size
    heat = logits_to_original(torch.from_numpy(cam.heatmaps[:, None]), (height, width), prediction.placement,
                              fill=0.0)
    heat = heat[0, 0].clamp(0, 1).numpy()
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32) / 255.0
    return blend_heatmaps(rgb[None], heat[None])[0]


def mask_png(mask: np.ndarray) -> bytes:
    """The 0/255 mask as PNG bytes (the file `test.py --input` writes)."""
    ok, encoded = cv2.imencode(".png", mask)
    if not ok:
        raise RuntimeError("could not encode the mask as PNG")
    return encoded.tobytes()


def prediction_record(prediction: ImagePrediction, grey: np.ndarray, threshold: float, tta: bool, source: str,
                      checkpoint: Union[str, Path], model_name: str) -> dict:
    """Everything the page shows for one upload, as JSON-ready values."""
    record = {
        "file": source,
        "size": {"width": prediction.size[0], "height": prediction.size[1]},
        "predicted_class": prediction.predicted_class,
        "probabilities": {name: round(float(p), 6) for name, p in zip(CLASS_NAMES, prediction.probabilities)},
        "tta": bool(tta),
        "placement": {"mode": prediction.placement.mode, "head_not_found": prediction.placement.fallback,
                      "head_box": None if prediction.placement.box is None else dict(
                          zip(("top", "left", "side"), prediction.placement.box))},
        "latency_ms": round(prediction.seconds * 1000, 2),
        "model": model_name,
        "checkpoint": str(checkpoint),
    }
    mask = prediction.mask(threshold)
    if mask is not None:
        record.update(threshold=float(threshold), head_threshold=HEAD_THRESHOLD, **tumour_area(mask, grey))
    return record


def record_json(record: dict) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode("utf-8")
