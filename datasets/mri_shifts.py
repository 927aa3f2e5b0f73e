"""MRI acquisition shifts: what another scanner or protocol does to a slice, as transforms of the decoded uint8
greyscale image (and, for the geometric one, its mask) before normalisation.

One implementation serves two users: the acquisition-shift benchmark (`evaluation/shift.py`) applies each shift
at a fixed severity with a per-image seed, and training augmentation (`datasets/transforms.py`) draws a random
severity through `MriShiftAugment`. Severity is continuous in [0, 3]: 0 is the identity, 1-3 the benchmark
levels, and parameters are interpolated linearly in between (`SEVERITY_TABLE`).

| shift | what it models | severity 1 / 2 / 3 |
|---|---|---|
| `intensity` | global gain and offset (another scanner's scaling) | x0.80 +4 / x0.60 +8 / x0.45 +12 grey levels |
| `gamma` | non-linear intensity response | gamma 1.3 / 1.6 / 2.0 |
| `bias_field` | smooth multiplicative coil inhomogeneity: exp of a random cubic polynomial in x, y (no constant term) | coefficients in +-0.2 / +-0.35 / +-0.5 |
| `noise` | Rician noise, magnitude of a complex signal with Gaussian noise in both parts | sigma 4 / 8 / 14 grey levels |
| `low_resolution` | a lower-resolution scanner: Gaussian blur, downsample, upsample back (bilinear) | factor 1.5 / 2 / 3 |
| `contrast` | another display window: [lo, hi] stretched to [0, 255], outside clipped | [10, 220] / [20, 185] / [30, 150] |
| `rotate_zoom` | head position and field of view: rotation (random sign) and zoom out; the mask moves too | 5 deg x0.95 / 10 deg x0.90 / 15 deg x0.85 |
| `ghosting` | motion ghosting: every other phase-encoding line (rows of k-space) gets a phase error, so a copy of the head appears shifted by half the field of view | phase error 0.35 / 0.7 / 1.2 rad |
| `kspace_truncation` | a shorter acquisition along the phase-encoding axis only: the outer rows of k-space are zeroed (Gibbs ringing, blur along one axis) | keep 60 % / 40 % / 25 % of the rows |
| `histogram_match` | another sequence's contrast: the grey levels remapped so that their histogram matches another slice's (a synthetic slice of datasets/synthetic.py, or slices given as `references`), blended with the original | weight 1/3 / 2/3 / 1 |

`HELD_OUT` lists the shifts that no training augmentation imitates; `imitated_by(name, augment)` names the
augmentation keys (`data.augment.p_*`) that do imitate a shift, so the shift table can say which of its rows
are in-distribution for a recipe.

Bias field and Rician noise follow TorchIO's `RandomBiasField` and the standard magnitude-image noise model;
they are written here on numpy/OpenCV because TorchIO needs SimpleITK and nibabel and works on 3-D volumes.
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Optional, Sequence

import albumentations as A
import cv2
import numpy as np

SEVERITIES = (1, 2, 3)
MAX_SEVERITY = 3.0

# Parameter anchors at severities 0, 1, 2, 3 (severity 0 is the identity).
SEVERITY_TABLE: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "intensity": {"scale": (1.0, 0.8, 0.6, 0.45), "offset": (0.0, 4.0, 8.0, 12.0)},
    "gamma": {"gamma": (1.0, 1.3, 1.6, 2.0)},
    "bias_field": {"coefficient": (0.0, 0.2, 0.35, 0.5)},
    "noise": {"sigma": (0.0, 4.0, 8.0, 14.0)},
    "low_resolution": {"factor": (1.0, 1.5, 2.0, 3.0)},
    "contrast": {"low": (0.0, 10.0, 20.0, 30.0), "high": (255.0, 220.0, 185.0, 150.0)},
    "rotate_zoom": {"angle": (0.0, 5.0, 10.0, 15.0), "zoom": (1.0, 0.95, 0.9, 0.85)},
    "ghosting": {"phase": (0.0, 0.35, 0.7, 1.2)},
    "kspace_truncation": {"keep": (1.0, 0.6, 0.4, 0.25)},
    "histogram_match": {"weight": (0.0, 1 / 3, 2 / 3, 1.0)},
}
SHIFT_NAMES = tuple(SEVERITY_TABLE)
# Augmentation keys (data.augment) whose transform imitates each shift; a shift with none is held out.
IMITATED_BY: dict[str, tuple[str, ...]] = {
    "intensity": ("p_mri_intensity", "p_brightness_contrast"),
    "gamma": ("p_mri_gamma", "p_gamma"),
    "bias_field": ("p_bias_field",),
    "noise": ("p_mri_noise", "p_noise"),
    "low_resolution": ("p_low_resolution", "p_resample", "p_blur"),
    "contrast": ("p_mri_contrast", "p_brightness_contrast"),
    "rotate_zoom": ("p_mri_rotate_zoom", "p_rotate", "p_shift_scale"),
    "ghosting": (),
    "kspace_truncation": (),
    "histogram_match": (),
}
HELD_OUT = tuple(name for name in SHIFT_NAMES if not IMITATED_BY[name])


def imitated_by(name: str, augment: Any = None) -> list[str]:
    """The augmentation keys that imitate shift `name`: all of them, or with `augment` (an AugmentConfig) only
    those switched on there (probability > 0). Empty: the shift is out of distribution for that recipe."""
    if name not in IMITATED_BY:
        raise ValueError(f"unknown shift '{name}'; expected one of {', '.join(SHIFT_NAMES)}")
    keys = list(IMITATED_BY[name])
    return keys if augment is None else [k for k in keys if getattr(augment, k, 0) > 0]
BIAS_FIELD_ORDER = 3


def severity_params(name: str, severity: float) -> dict[str, float]:
    """The parameters of shift `name` at `severity` (clipped to [0, 3], linear between the table's anchors)."""
    if name not in SEVERITY_TABLE:
        raise ValueError(f"unknown shift '{name}'; expected one of {', '.join(SHIFT_NAMES)}")
    s = float(np.clip(severity, 0.0, MAX_SEVERITY))
    return {key: float(np.interp(s, (0, 1, 2, 3), anchors)) for key, anchors in SEVERITY_TABLE[name].items()}


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _keep_shape(fn: Callable[[np.ndarray], np.ndarray], array: np.ndarray) -> np.ndarray:
    """Run a 2-D OpenCV operation on an (H, W) or (H, W, 1) array and return the input's shape."""
    return fn(array.reshape(array.shape[:2])).reshape(array.shape)


# ----------------------------------------------------------------------------- image operations
def scale_offset(image: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """x * scale + offset, clipped to 0..255."""
    return _to_uint8(image.astype(np.float32) * scale + offset)


def gamma_curve(image: np.ndarray, gamma: float) -> np.ndarray:
    """255 * (x / 255) ** gamma, through a lookup table (exact identity at gamma 1)."""
    lut = _to_uint8(255.0 * (np.arange(256) / 255.0) ** gamma)
    return lut[image]


def bias_field(shape: Sequence[int], coefficients: np.ndarray, order: int = BIAS_FIELD_ORDER) -> np.ndarray:
    """exp(sum_{1 <= i+j <= order} c_ij x^i y^j) on x, y in [-1, 1]: a smooth multiplicative field (1 at c = 0)."""
    ys, xs = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    log_field = np.zeros(tuple(shape[:2]), np.float64)
    terms = [(i, j) for i in range(order + 1) for j in range(order + 1 - i) if i + j > 0]
    for (i, j), c in zip(terms, coefficients):
        log_field += c * xs**i * ys**j
    return np.exp(log_field)


def bias_field_terms(order: int = BIAS_FIELD_ORDER) -> int:
    return (order + 1) * (order + 2) // 2 - 1


def rician_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """|x + n1 + i n2| with n1, n2 ~ N(0, sigma): a magnitude image's noise (the background becomes non-zero)."""
    x = image.astype(np.float64)
    real = x + rng.normal(0.0, sigma, x.shape)
    imag = rng.normal(0.0, sigma, x.shape)
    return _to_uint8(np.sqrt(real**2 + imag**2))


def low_resolution(image: np.ndarray, factor: float) -> np.ndarray:
    """Blur with sigma 0.5 * (factor - 1), downsample by `factor` (area), upsample back (bilinear)."""
    if factor <= 1.0:
        return image

    def degrade(plane: np.ndarray) -> np.ndarray:
        h, w = plane.shape
        blurred = cv2.GaussianBlur(plane, (0, 0), sigmaX=0.5 * (factor - 1.0))
        small = cv2.resize(blurred, (max(1, round(w / factor)), max(1, round(h / factor))),
                           interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)

    return _keep_shape(degrade, image)


def window(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Stretch the window [low, high] to [0, 255]; values outside are clipped."""
    return _to_uint8((image.astype(np.float32) - low) * (255.0 / max(high - low, 1e-6)))


def rotate_zoom(array: np.ndarray, angle: float, zoom: float, nearest: bool) -> np.ndarray:
    """Rotate by `angle` degrees and scale by `zoom` about the centre; zero fill. Masks use nearest neighbour."""
    if angle == 0.0 and zoom == 1.0:
        return array

    def warp(plane: np.ndarray) -> np.ndarray:
        h, w = plane.shape
        matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, zoom)
        flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        return cv2.warpAffine(plane, matrix, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    return _keep_shape(warp, array)


def ghosting(image: np.ndarray, phase: float) -> np.ndarray:
    """Magnitude of the image whose odd k-space rows carry a phase error `phase` (radians): a ghost of the head
    shifted by half the field of view along the rows, of relative strength sin(phase / 2)."""
    if phase == 0.0:
        return image

    def ghost(plane: np.ndarray) -> np.ndarray:
        k = np.fft.fft2(plane.astype(np.float64))
        k[1::2] *= np.exp(1j * phase)
        return _to_uint8(np.abs(np.fft.ifft2(k)))

    return _keep_shape(ghost, image)


def kspace_truncation(image: np.ndarray, keep: float) -> np.ndarray:
    """Keep the central `keep` fraction of the k-space rows (phase-encoding axis), zero the others."""
    if keep >= 1.0:
        return image

    def truncate(plane: np.ndarray) -> np.ndarray:
        k = np.fft.fftshift(np.fft.fft2(plane.astype(np.float64)), axes=0)
        rows = plane.shape[0]
        kept = max(1, int(round(rows * keep)))
        start = (rows - kept) // 2
        k[:start], k[start + kept:] = 0, 0
        return _to_uint8(np.abs(np.fft.ifft2(np.fft.ifftshift(k, axes=0))))

    return _keep_shape(truncate, image)


def match_histogram(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Grey levels of `image` remapped so that their cumulative histogram follows `reference`'s."""
    source_cdf = np.cumsum(np.bincount(image.reshape(-1), minlength=256)) / image.size
    reference_cdf = np.cumsum(np.bincount(reference.reshape(-1), minlength=256)) / reference.size
    lut = np.searchsorted(reference_cdf, source_cdf, side="left").clip(0, 255).astype(np.uint8)
    return lut[image]


def reference_slice(seed: int, size: int = 128) -> np.ndarray:
    """A slice of another contrast to match histograms to: a synthetic slice (datasets/synthetic.py) whose grey
    levels are inverted inside the head (a T2-like contrast: dark tissue, bright fluid)."""
    from .synthetic import render  # the generator is only needed here

    rng = np.random.default_rng(seed)
    grey, _ = render(rng, int(rng.integers(4)), ("ax", "co", "sa")[int(rng.integers(3))], (size, size))
    head = grey > 8
    return np.where(head, 255 - grey, grey).astype(np.uint8)


# ----------------------------------------------------------------------------- shifts
def draw_params(name: str, severity: float, rng: np.random.Generator) -> dict[str, Any]:
    """Everything one application of shift `name` needs, random parts drawn from `rng` (image and mask share it)."""
    params: dict[str, Any] = severity_params(name, severity)
    if name == "bias_field":
        a = params["coefficient"]
        params["coefficients"] = rng.uniform(-a, a, bias_field_terms())
    elif name == "noise":
        params["noise_seed"] = int(rng.integers(2**32))
    elif name == "rotate_zoom":
        params["angle"] *= 1.0 if rng.random() < 0.5 else -1.0
    elif name == "histogram_match":
        params["reference_seed"] = int(rng.integers(2**31))
    return params


def shift_image(name: str, image: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Shift `name` applied to a uint8 greyscale image with parameters from `draw_params`."""
    if name == "intensity":
        return scale_offset(image, params["scale"], params["offset"])
    if name == "gamma":
        return gamma_curve(image, params["gamma"])
    if name == "bias_field":
        field = bias_field(image.shape, params["coefficients"]).reshape(image.shape[:2] + (1,) * (image.ndim - 2))
        return _to_uint8(image * field)
    if name == "noise":
        return rician_noise(image, params["sigma"], np.random.default_rng(params["noise_seed"]))
    if name == "low_resolution":
        return low_resolution(image, params["factor"])
    if name == "contrast":
        return window(image, params["low"], params["high"])
    if name == "rotate_zoom":
        return rotate_zoom(image, params["angle"], params["zoom"], nearest=False)
    if name == "ghosting":
        return ghosting(image, params["phase"])
    if name == "kspace_truncation":
        return kspace_truncation(image, params["keep"])
    if name == "histogram_match":
        reference = params.get("reference")
        if reference is None:
            reference = reference_slice(params["reference_seed"])
        matched = match_histogram(image, reference).astype(np.float32)
        return _to_uint8((1.0 - params["weight"]) * image + params["weight"] * matched)
    raise ValueError(f"unknown shift '{name}'; expected one of {', '.join(SHIFT_NAMES)}")


def shift_mask(name: str, mask: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """The mask under shift `name`: moved by the geometric shift, unchanged by the intensity ones."""
    if name == "rotate_zoom":
        return rotate_zoom(mask, params["angle"], params["zoom"], nearest=True)
    return mask


def image_seed(seed: int, name: str, severity: float, stem: str) -> np.random.Generator:
    """A generator that depends only on (seed, shift, severity, image id): not on order, batch or worker."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), int(round(severity * 1000)),
                                  zlib.crc32(stem.encode())])


def apply_shift(name: str, severity: float, image: np.ndarray, mask: np.ndarray, stem: str, seed: int = 0,
                references: Optional[Sequence[np.ndarray]] = None) -> tuple[np.ndarray, np.ndarray]:
    """One image (and its mask) under shift `name` at `severity`, deterministic for (seed, stem).
    `references`: uint8 slices for `histogram_match` to draw from (default: synthetic slices)."""
    if name not in SEVERITY_TABLE:
        raise ValueError(f"unknown shift '{name}'; expected one of {', '.join(SHIFT_NAMES)}")
    if severity == 0:
        return image, mask
    rng = image_seed(seed, name, severity, stem)
    params = draw_params(name, severity, rng)
    if name == "histogram_match" and references:
        params["reference"] = references[int(rng.integers(len(references)))]
    return shift_image(name, image, params), shift_mask(name, mask, params)


class ShiftHook:
    """A picklable `(image, mask, stem) -> (image, mask)` callable for `BriscDataset.shift` (DataLoader workers)."""

    def __init__(self, name: str, severity: float, seed: int = 0,
                 references: Optional[Sequence[np.ndarray]] = None) -> None:
        severity_params(name, severity)  # validates the name
        self.name, self.severity, self.seed = name, float(severity), int(seed)
        self.references = list(references) if references else None

    def __call__(self, image: np.ndarray, mask: np.ndarray, stem: str) -> tuple[np.ndarray, np.ndarray]:
        return apply_shift(self.name, self.severity, image, mask, stem, self.seed, self.references)


class MriShiftAugment(A.DualTransform):
    """Training augmentation: shift `name` at a severity drawn uniformly from `severity_range`, with probability p.

    Draws from the pipeline's seeded random stream, so augmentations stay reproducible like the others.
    """

    def __init__(self, name: str, severity_range: Sequence[float] = (0.0, 2.0), p: float = 0.5) -> None:
        super().__init__(p=p)
        severity_params(name, 0.0)  # validates the name
        low, high = float(severity_range[0]), float(severity_range[1])
        if not 0.0 <= low <= high <= MAX_SEVERITY:
            raise ValueError(f"severity range {list(severity_range)} must satisfy 0 <= low <= high <= {MAX_SEVERITY}")
        self.name, self.severity_range = name, (low, high)

    def get_params(self) -> dict[str, Any]:
        severity = self.py_random.uniform(*self.severity_range)
        return {"shift_params": draw_params(self.name, severity, self.random_generator)}

    def apply(self, img: np.ndarray, shift_params: Optional[dict] = None, **params: Any) -> np.ndarray:
        return shift_image(self.name, img, shift_params)

    def apply_to_mask(self, mask: np.ndarray, shift_params: Optional[dict] = None, **params: Any) -> np.ndarray:
        return shift_mask(self.name, mask, shift_params)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("name", "severity_range")
