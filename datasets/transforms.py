"""Joint image/mask transforms (albumentations) and the conversion to normalised tensors.

Images arrive as one uint8 greyscale channel at the training size (see `decode.py`), so augmentations run
on a single small channel; the channel is replicated to `in_channels` only at the end, fused with the
normalisation. Masks follow every geometric transform with nearest-neighbour sampling and stay 0/255.
"""
from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info

from utils.config import AugmentConfig, DataConfig, PreprocessConfig

from .decode import MASK_THRESHOLD, read_grey, to_square
from .geometry import Placement, place
from .mri_shifts import MriShiftAugment

INTENSITY_NORMS = ("imagenet", "zscore", "percentile")
# (config key, shift name) of the MRI acquisition-shift augmentations, in the order they are applied
MRI_AUGMENTS = (("p_mri_rotate_zoom", "rotate_zoom"), ("p_mri_intensity", "intensity"), ("p_mri_contrast", "contrast"),
                ("p_mri_gamma", "gamma"), ("p_bias_field", "bias_field"), ("p_low_resolution", "low_resolution"),
                ("p_mri_noise", "noise"))


def _sym(limit: float) -> tuple[float, float]:
    return (-float(limit), float(limit))


def train_pipeline(image_size: int, aug: AugmentConfig) -> A.Compose:
    """Training augmentations; each transform fires with its own probability (0 leaves it out)."""
    steps = [
        (aug.p_hflip, lambda p: A.HorizontalFlip(p=p)),
        (aug.p_vflip, lambda p: A.VerticalFlip(p=p)),
        (
            aug.p_random_resized_crop,
            lambda p: A.RandomResizedCrop(
                size=(image_size, image_size), scale=tuple(aug.crop_scale), ratio=tuple(aug.crop_ratio), p=p
            ),
        ),
        (aug.p_rotate, lambda p: A.Affine(rotate=_sym(aug.rotate_limit), border_mode=cv2.BORDER_CONSTANT, p=p)),
        (
            aug.p_shift_scale,
            lambda p: A.Affine(
                translate_percent=_sym(aug.shift_limit),
                scale=(1.0 - aug.scale_limit, 1.0 + aug.scale_limit),
                border_mode=cv2.BORDER_CONSTANT,
                p=p,
            ),
        ),
        (
            aug.p_elastic,
            lambda p: A.ElasticTransform(
                alpha=aug.elastic_alpha, sigma=aug.elastic_sigma, approximate=True, border_mode=cv2.BORDER_CONSTANT, p=p
            ),
        ),
        (
            aug.p_brightness_contrast,
            lambda p: A.RandomBrightnessContrast(
                brightness_limit=_sym(aug.brightness_limit), contrast_limit=_sym(aug.contrast_limit), p=p
            ),
        ),
        (aug.p_gamma, lambda p: A.RandomGamma(gamma_limit=tuple(aug.gamma_limit), p=p)),
        (aug.p_blur, lambda p: A.GaussianBlur(sigma_limit=tuple(aug.blur_sigma), p=p)),
        (aug.p_noise, lambda p: A.GaussNoise(std_range=tuple(aug.noise_std), p=p)),
    ]
    steps += [
        (aug.p_jpeg, lambda p: A.ImageCompression(quality_range=tuple(int(q) for q in aug.jpeg_quality), p=p)),
        (aug.p_resample, lambda p: A.Downscale(scale_range=tuple(aug.resample_scale), p=p)),
        (aug.p_sharpen, lambda p: A.Sharpen(alpha=(0.1, 0.4), lightness=(1.0, 1.0), p=p)),
        (aug.p_posterize, lambda p: A.Posterize(num_bits=tuple(int(b) for b in aug.posterize_bits), p=p)),
    ]
    transforms = [make(p) for p, make in steps if p > 0]
    transforms += [MriShiftAugment(name, aug.mri_severity, p=getattr(aug, key))
                   for key, name in MRI_AUGMENTS if getattr(aug, key) > 0]
    # The cached image is already at the training size; the resize only matters for other inputs.
    return A.Compose([A.Resize(image_size, image_size), *transforms])


class RandomCanvas:
    """Training augmentation on the decoded file, before the geometry step: with probability `p` (`fires`), the
    canvas is cropped or padded (zeros, an even chance of each) to an aspect ratio (width / height) drawn log-uniformly
    from `ratio`, at a random position; the mask follows. A file's shape then says nothing about its class.

    Its random stream follows torch's seed of the process like `SampleTransform` (distinct per worker/epoch)."""

    def __init__(self, p: float, ratio: Sequence[float] = (0.6, 1.6)) -> None:
        if not 0.0 <= p <= 1.0 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"RandomCanvas needs 0 <= p <= 1 and 0 < ratio[0] <= ratio[1], got {p}, {list(ratio)}")
        self.p, self.ratio = float(p), (float(ratio[0]), float(ratio[1]))
        self._seed: Optional[int] = None
        self.rng = np.random.default_rng(0)

    def fires(self) -> bool:
        """Draw whether the next sample gets a new canvas (a sample that does not can come from the cache)."""
        seed = SampleTransform._torch_seed() % 2**32
        if seed != self._seed:
            self._seed, self.rng = seed, np.random.default_rng(seed)
        return bool(self.rng.random() < self.p)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pair on a new canvas (always: `fires` decides whether to call it)."""
        height, width = image.shape[:2]
        target = float(np.exp(self.rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1]))))
        wider = target > width / height
        if self.rng.random() < 0.5:  # pad the short side up to the ratio
            new_h, new_w = (height, round(height * target)) if wider else (round(width / target), width)
            top, left = int(self.rng.integers(new_h - height + 1)), int(self.rng.integers(new_w - width + 1))
            pad = (top, new_h - height - top, left, new_w - width - left)
            return tuple(cv2.copyMakeBorder(a, *pad, cv2.BORDER_CONSTANT, value=0) for a in (image, mask))
        # crop the long side down to the ratio
        new_h, new_w = (max(1, round(width / target)), width) if wider else (height, max(1, round(height * target)))
        top, left = int(self.rng.integers(height - new_h + 1)), int(self.rng.integers(width - new_w + 1))
        return image[top:top + new_h, left:left + new_w], mask[top:top + new_h, left:left + new_w]


def eval_pipeline(image_size: int) -> A.Compose:
    return A.Compose([A.Resize(image_size, image_size)])


def channel_stats(mean: Sequence[float], std: Sequence[float], in_channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std for `in_channels`; one channel uses the average of the given values."""
    if len(mean) != len(std) or len(mean) == 0:
        raise ValueError(f"mean {list(mean)} and std {list(std)} must be non-empty and of the same length")
    if len(mean) == in_channels:
        return [float(m) for m in mean], [float(s) for s in std]
    if in_channels == 1:
        return [float(np.mean(mean))], [float(np.mean(std))]
    if len(mean) == 1:
        return [float(mean[0])] * in_channels, [float(std[0])] * in_channels
    raise ValueError(f"{len(mean)} mean/std values do not fit in_channels={in_channels} (give 1 or {in_channels})")


def standardise(grey: torch.Tensor, method: str, percentile_range: Sequence[float] = (0.5, 99.5)) -> torch.Tensor:
    """Per-image intensity standardisation of a float (1, H, W) image in 0..255, invariant to a global gain.

    zscore: (x - mean) / std over the head, taken as the pixels above the image's mean (background is dark in MRI);
    percentile: clip to the image's percentiles and scale that range to 0..255 (the ImageNet statistics follow).
    """
    if method == "zscore":
        head = grey[grey > grey.mean()]
        head = head if head.numel() >= 2 else grey.flatten()
        return (grey - head.mean()) / head.std().clamp_min(1e-6)
    if method == "percentile":
        q = torch.tensor([percentile_range[0] / 100.0, percentile_range[1] / 100.0])
        low, high = torch.quantile(grey.flatten(), q).tolist()
        if high <= low:
            return torch.zeros_like(grey)
        return (grey.clamp(low, high) - low) * (255.0 / (high - low))
    raise ValueError(f"unknown intensity normalisation '{method}'; expected one of {', '.join(INTENSITY_NORMS)}")


class SampleTransform:
    """(grey uint8 HxW image, 0/255 uint8 HxW mask) -> (float CxHxW normalised image, float 1xHxW {0,1} mask).

    This is the one place where images become model inputs (training, test.py, test.py --input, the benchmarks),
    so `intensity_norm` acts on all of them alike.
    """

    def __init__(
        self,
        pipeline: A.Compose,
        in_channels: int = 3,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        intensity_norm: str = "imagenet",
        percentile_range: Sequence[float] = (0.5, 99.5),
    ) -> None:
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if intensity_norm not in INTENSITY_NORMS:
            raise ValueError(f"intensity_norm must be one of {', '.join(INTENSITY_NORMS)}, got {intensity_norm!r}")
        self.pipeline = pipeline
        self.in_channels = in_channels
        self.intensity_norm, self.percentile_range = intensity_norm, tuple(percentile_range)
        mean, std = channel_stats(mean, std, in_channels)
        # normalised = pixel * scale + offset, with pixel in 0..255
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(-1, 1, 1)
        self.offset = torch.tensor([-m / s for m, s in zip(mean, std)]).view(-1, 1, 1)
        self._seed: Optional[int] = None

    def _follow_torch_seed(self) -> None:
        """Seed the augmentations from torch's seed of this process, whenever that changes.

        Forked DataLoader workers inherit the pipeline's random state, so without this every worker, in
        every epoch, would draw the same augmentations. Torch gives each worker a distinct seed per epoch
        (and the main process the one from `torch.manual_seed`), which makes augmentations reproducible too.
        """
        seed = self._torch_seed()
        if seed != self._seed:
            self._seed = seed
            self._seed_pipeline(seed)

    @staticmethod
    def _torch_seed() -> int:
        info = get_worker_info()
        return info.seed if info is not None else torch.initial_seed()

    def _seed_pipeline(self, seed: int) -> None:
        seed %= 2**32
        # One shared stream for all transforms (seeding each with the same value would correlate them).
        self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def set_random_seed(self, seed: int) -> None:
        """Restart the augmentation stream from `seed` (the trainer does this every epoch when it loads data
        in the main process, so a resumed run draws the same augmentations as an uninterrupted one)."""
        self._seed_pipeline(seed)
        self._seed = self._torch_seed()

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        self._follow_torch_seed()
        out = self.pipeline(image=image, mask=mask)
        grey = torch.from_numpy(np.ascontiguousarray(out["image"])).reshape(1, *out["image"].shape[:2]).float()
        if self.intensity_norm == "zscore":
            image_t = standardise(grey, "zscore").repeat(self.in_channels, 1, 1)
        else:
            if self.intensity_norm == "percentile":
                grey = standardise(grey, "percentile", self.percentile_range)
            image_t = torch.addcmul(self.offset, grey, self.scale)  # broadcasts the grey channel to C channels
        mask_t = torch.from_numpy(np.ascontiguousarray(out["mask"]) >= MASK_THRESHOLD).unsqueeze(0).float()
        return image_t, mask_t


def build_transform(
    image_size: int,
    train: bool,
    augment: Optional[AugmentConfig] = None,
    in_channels: int = 3,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    intensity_norm: str = "imagenet",
    percentile_range: Sequence[float] = (0.5, 99.5),
) -> SampleTransform:
    """The training (augmenting) or evaluation (resize + normalise) transform."""
    pipeline = train_pipeline(image_size, augment or AugmentConfig()) if train else eval_pipeline(image_size)
    return SampleTransform(pipeline, in_channels=in_channels, mean=mean, std=std, intensity_norm=intensity_norm,
                           percentile_range=percentile_range)


_BUILT = threading.local()  # per thread: the evaluation transforms built so far, by settings


def inference_transform(prep: PreprocessConfig) -> Callable:
    """The evaluation transform (no augmentation) of the `data.preprocess` settings: a placed uint8 square to
    the model's normalised input. Built once per settings and thread: building an albumentations pipeline costs
    about as much as running it (0.7 ms), which a folder of slices or a web upload would pay per image."""
    key = (prep.image_size, prep.in_channels, tuple(prep.mean), tuple(prep.std), prep.intensity_norm,
           tuple(prep.percentile_range))
    built = _BUILT.__dict__.setdefault("transforms", {})
    if key not in built:
        built[key] = build_transform(prep.image_size, train=False, in_channels=prep.in_channels, mean=prep.mean,
                                     std=prep.std, intensity_norm=prep.intensity_norm,
                                     percentile_range=prep.percentile_range)
    return built[key]


def prepare_for_inference(path: Union[str, Path, np.ndarray], data_cfg: DataConfig) -> tuple[torch.Tensor, Placement]:
    """Any image file (or its decoded uint8 greyscale array) as the model's normalised (C, S, S) input,
    decoded and placed as in training (`data.preprocess`), and its `Placement`: what
    `geometry.logits_to_original(logits, placement.original_hw, placement)` needs to map a mask back."""
    prep = data_cfg.preprocess
    grey = path if isinstance(path, np.ndarray) else read_grey(Path(path))
    placement = place(grey, prep.image_size, prep.resize, prep.head_margin)
    empty = np.zeros((prep.image_size, prep.image_size), np.uint8)
    image, _ = inference_transform(prep)(to_square(grey, prep.image_size, placement), empty)
    return image, placement


def load_image_for_inference(path: Union[str, Path, np.ndarray], data_cfg: DataConfig
                             ) -> tuple[torch.Tensor, tuple[int, int]]:
    """`prepare_for_inference` returning the image's original (width, height) instead of its placement (enough
    to map a mask back in stretch and letterbox modes; head mode needs the placement)."""
    image, placement = prepare_for_inference(path, data_cfg)
    return image, (placement.original_hw[1], placement.original_hw[0])
