"""Generate a synthetic dataset with the exact BRISC 2025 layout: the project's embedded default data.

    python -m datasets.synthetic --out data/demo_brisc --train 400 --test 100 --seed 0

Every image is a T1-like brain slice (scalp, skull, cortex with sulci, white matter, ventricles, a small
normal pituitary gland) in one of three planes, with a class-specific tumour:

- glioma: irregular, heterogeneous (hypo-intense core, often an enhancing rim, sometimes oedema) inside
  the parenchyma;
- meningioma: round, bright, homogeneous, attached to the inner skull;
- pituitary: small, bright, at the skull-base centre (where the other classes show a small normal gland);
- no tumour: none.

Sizes, positions, contrast, noise, bias field and image size vary. Files are JPEG (1- or 3-channel, like the
release; no-tumour images always 3-channel) and PNG masks with JPEG-like ringing values (0-7 / 248-255),
no-tumour images only in `classification_task`, class index ranges in the release's order (gl, me, no, pi)
and proportions. The output depends only on the arguments; it is written to a temporary folder and renamed,
so an interrupted run never leaves a partial dataset.

Planted duplicates (off by default), for tests of the duplicate search and of leak-free evaluation:
`--train-duplicates N` makes N train images pixel copies of other train images of the same class, and
`--leaks N` makes N test images pixel copies of train images of the same class. A copy is written as a PNG
of the original's decoded pixels (other bytes, identical pixels) with a byte copy of its mask;
`SYNTHETIC.json` lists the planted pairs under "planted" ({copy stem: original stem}).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from .naming import CLASS_NAMES, NO_TUMOR, format_name

GENERATOR_VERSION = 1
# Images per class in the release (gl, me, no, pi); generated splits keep these proportions.
RELEASE_COUNTS = {"train": (1147, 1329, 1067, 1457), "test": (254, 306, 140, 300)}
PLANE_ORDER = ("ax", "co", "sa")
# (height, width) of the written files; the release is mostly 512x512 with a spread of other sizes.
IMAGE_SIZES = [(512, 512)] * 6 + [(256, 256), (320, 257), (369, 369), (369, 216), (630, 630), (442, 442)]
WORK_SIZE = 256  # longest side of the canvas the slice is drawn on before resizing to the file size

GLIOMA, MENINGIOMA, PITUITARY = 0, 1, 3


# --------------------------------------------------------------------------------------------- layout
def class_counts(n: int, split: str) -> list[int]:
    """`n` split over the classes in the release's proportions (largest remainder, at least one each)."""
    if n < len(CLASS_NAMES):
        raise ValueError(f"need at least {len(CLASS_NAMES)} images per split, got {n}")
    shares = np.asarray(RELEASE_COUNTS[split], dtype=float)
    exact = shares / shares.sum() * (n - len(CLASS_NAMES))
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - len(CLASS_NAMES) - counts.sum()]:
        counts[i] += 1
    return [int(c) + 1 for c in counts]


def plan_split(n: int, split: str) -> list[tuple[int, int, str]]:
    """(index, label, plane) for every image: consecutive indices per class, planes in blocks ax, co, sa."""
    plan, index = [], 1
    for label, count in enumerate(class_counts(n, split)):
        for k in range(count):
            plan.append((index, label, PLANE_ORDER[k * len(PLANE_ORDER) // count]))
            index += 1
    return plan


# --------------------------------------------------------------------------------------------- drawing
def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1] with `cells` features across the longest side."""
    h, w = shape
    gh, gw = max(2, round(cells * h / max(h, w))), max(2, round(cells * w / max(h, w)))
    coarse = rng.uniform(-1.0, 1.0, (gh, gw)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def soft(field: np.ndarray, edge: float = 1.0) -> np.ndarray:
    """A soft 0..1 region from a signed field (positive inside); `edge` is the transition width in pixels."""
    return np.clip(0.5 + field / edge, 0.0, 1.0)


class Head:
    """Geometry of one slice: an ellipse (centre, semi-axes, tilt) and coordinates normalised to it."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int], plane: str) -> None:
        h, w = shape
        self.shape = shape
        side = min(h, w)
        rx, ry = {"ax": (0.38, 0.44), "co": (0.42, 0.41), "sa": (0.45, 0.39)}[plane]
        self.ax = side * rx * rng.uniform(0.93, 1.05)
        self.ay = side * ry * rng.uniform(0.93, 1.05)
        self.cx = w / 2 + rng.uniform(-0.03, 0.03) * w
        self.cy = h / 2 + rng.uniform(-0.03, 0.03) * h
        self.tilt = np.deg2rad(rng.uniform(-8, 8))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.xx, self.yy = xx, yy
        self.u, self.v = self.to_local(xx, yy)
        self.r = np.sqrt(self.u**2 + self.v**2)  # 1.0 on the outer skin, brain inside about 0.9
        self.scale = (self.ax + self.ay) / 2  # pixels per unit of normalised radius

    def to_local(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = np.cos(self.tilt), np.sin(self.tilt)
        dx, dy = x - self.cx, y - self.cy
        return (c * dx + s * dy) / self.ax, (-s * dx + c * dy) / self.ay

    def to_pixels(self, u: float, v: float) -> tuple[float, float]:
        """Pixel position of the point with normalised coordinates (u, v) (u right, v down)."""
        c, s = np.cos(self.tilt), np.sin(self.tilt)
        x, y = u * self.ax, v * self.ay
        return self.cx + c * x - s * y, self.cy + s * x + c * y

    def blob(self, centre: tuple[float, float], radius: float, wobble: float, rng: np.random.Generator,
             aspect: float = 1.0) -> np.ndarray:
        """Signed distance-like field (pixels, positive inside) of a star-shaped blob; `wobble` sets the
        amplitude of its boundary harmonics (0: an ellipse). Computed in a window around the blob: far from
        it the field is a constant negative value (at least `radius` away from the boundary)."""
        amps = [wobble * rng.uniform(0.3, 1.0) / k**0.5 for k in range(2, 6)]
        phases = rng.uniform(0, 2 * np.pi, 4)
        reach = radius * (2.0 + sum(amps)) * max(aspect, 1.0) + 4  # beyond the boundary by >= radius
        h, w = self.shape
        x0, x1 = max(0, int(centre[0] - reach)), min(w, int(centre[0] + reach) + 1)
        y0, y1 = max(0, int(centre[1] - reach)), min(h, int(centre[1] + reach) + 1)
        field = np.full(self.shape, -radius, np.float32)
        if x0 >= x1 or y0 >= y1:
            return field
        dx = self.xx[y0:y1, x0:x1] - centre[0]
        dy = (self.yy[y0:y1, x0:x1] - centre[1]) / aspect
        rho, theta = np.sqrt(dx**2 + dy**2), np.arctan2(dy, dx)
        edge = np.ones_like(theta)
        for k, amp, phase in zip(range(2, 6), amps, phases):
            edge += amp * np.cos(k * theta + phase)
        field[y0:y1, x0:x1] = np.maximum(radius * edge - rho, -radius)
        return field


def draw_brain(rng: np.random.Generator, head: Head, plane: str) -> np.ndarray:
    """A tumour-free T1-like slice in 0..1 intensities."""
    r = head.r
    wobble = 1.0 + 0.015 * smooth_noise(rng, head.shape, 10)
    rs = r * wobble
    px = 1.0 / head.scale  # one pixel in normalised radius
    image = np.zeros(head.shape, np.float32)
    image += 0.82 * soft((1.0 - rs) / px) * soft((rs - 0.955) / px)  # scalp fat (bright)
    image += 0.10 * soft((0.955 - rs) / px) * soft((rs - 0.915) / px)  # skull (dark)
    brain = soft((0.915 - rs) / px)
    grey = 0.42 + 0.03 * smooth_noise(rng, head.shape, 24)
    white = 0.60 + 0.03 * smooth_noise(rng, head.shape, 20)
    wm = soft((0.72 + 0.07 * smooth_noise(rng, head.shape, 8) - rs) / (2 * px))
    tissue = grey * (1 - wm) + white * wm
    sulci = np.abs(smooth_noise(rng, head.shape, 28)) < 0.08
    tissue = np.where(sulci & (rs > 0.66), 0.18, tissue)
    image = image * (1 - brain) + tissue * brain
    for centre, axes, angle in ventricles(rng, head, plane):
        ca, sa = np.cos(angle), np.sin(angle)
        du, dv = head.u - centre[0], head.v - centre[1]
        q = ((ca * du + sa * dv) / axes[0]) ** 2 + ((-sa * du + ca * dv) / axes[1]) ** 2
        region = soft((1.0 - q) * 4)
        image = image * (1 - region) + 0.14 * region
    return image


def ventricles(rng: np.random.Generator, head: Head, plane: str) -> list:
    """(centre, semi-axes, angle) of the dark ventricles in normalised coordinates."""
    k = rng.uniform(0.8, 1.25)
    if plane == "sa":
        return [((rng.uniform(-0.05, 0.05), -0.08), (0.28 * k, 0.06 * k), rng.uniform(-0.15, 0.15))]
    spread, angle = 0.09 * k, rng.uniform(0.15, 0.35)
    return [((-spread, -0.06), (0.05 * k, 0.2 * k), -angle), ((spread, -0.06), (0.05 * k, 0.2 * k), angle)]


def sella(head: Head, rng: np.random.Generator) -> tuple[float, float]:
    """Pixel position of the pituitary fossa: midline, near the skull base."""
    return head.to_pixels(rng.uniform(-0.03, 0.03), rng.uniform(0.5, 0.6))


def draw_tumour(rng: np.random.Generator, head: Head, label: int, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint the class's tumour (or the normal gland) into `image`; returns (image, soft 0..1 tumour mask)."""
    a = head.scale
    inside_brain = head.r < 0.9
    if label != PITUITARY:  # a small normal gland where a pituitary tumour would be
        gland = soft(head.blob(sella(head, rng), a * rng.uniform(0.035, 0.055), 0.05, rng))
        image = image * (1 - gland) + 0.5 * gland
    if label not in (GLIOMA, MENINGIOMA, PITUITARY):
        return image, np.zeros(head.shape, np.float32)

    texture = smooth_noise(rng, head.shape, 40)
    if label == GLIOMA:
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.5)
        centre = head.to_pixels(dist * np.cos(angle), dist * np.sin(angle))
        radius = a * rng.uniform(0.22, 0.34)
        field = head.blob(centre, radius, rng.uniform(0.15, 0.3), rng, aspect=rng.uniform(0.8, 1.25))
        if rng.random() < 0.4:  # peritumoural oedema: slightly dark, not part of the tumour
            halo = soft(field + radius * 0.35, edge=radius * 0.2) * inside_brain
            image = image - 0.04 * halo
        core = rng.uniform(0.2, 0.32) + 0.08 * texture
        if rng.random() < 0.7:  # enhancing rim around a necrotic core
            rim = soft(radius * 0.22 - np.abs(field - radius * 0.22), edge=2.0)
            core = core * (1 - rim) + rng.uniform(0.72, 0.88) * rim
        value = core
    elif label == MENINGIOMA:
        angle = rng.uniform(-np.pi, np.pi)
        while np.sin(angle) > 0.6:  # not on the skull base
            angle = rng.uniform(-np.pi, np.pi)
        radius = a * rng.uniform(0.16, 0.26)
        edge = head.to_pixels(0.9 * np.cos(angle), 0.9 * np.sin(angle))
        inward = np.array([head.cx - edge[0], head.cy - edge[1]])
        inward /= np.linalg.norm(inward)
        centre = (edge[0] + inward[0] * radius * 0.7, edge[1] + inward[1] * radius * 0.7)
        field = head.blob(centre, radius, rng.uniform(0.0, 0.08), rng, aspect=rng.uniform(0.85, 1.15))
        value = rng.uniform(0.76, 0.93) + 0.04 * texture
    else:
        radius = a * rng.uniform(0.12, 0.18)
        field = head.blob(sella(head, rng), radius, rng.uniform(0.0, 0.12), rng, aspect=rng.uniform(0.9, 1.3))
        value = rng.uniform(0.68, 0.86) + 0.05 * texture
    mask = soft(field, edge=1.5) * inside_brain
    return image * (1 - mask) + value * mask, mask


def render(rng: np.random.Generator, label: int, plane: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image, bool mask) of one slice at `size` (height, width)."""
    h, w = size
    work = (max(2, round(h * WORK_SIZE / max(h, w))), max(2, round(w * WORK_SIZE / max(h, w))))
    head = Head(rng, work, plane)
    image = draw_brain(rng, head, plane)
    image, soft_mask = draw_tumour(rng, head, label, image)
    image = image * (1.0 + 0.12 * smooth_noise(rng, work, 3))  # coil bias field
    sigma = rng.uniform(0.01, 0.03)
    real, imag = sigma * rng.standard_normal((2, *work), dtype=np.float32)
    image = np.sqrt((image + real) ** 2 + imag**2)  # Rician noise, as in magnitude MR images
    image = image * np.float32(rng.uniform(0.85, 1.15))
    image = cv2.resize(image.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    image += 0.01 * rng.standard_normal((h, w), dtype=np.float32)
    image = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    mask = cv2.resize(soft_mask, (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5
    return image, mask


def ring(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A 0/255 mask with JPEG-like ringing (0-7 / 248-255) along its boundary, as in the release."""
    binary = mask.astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    band = cv2.dilate(binary, kernel, iterations=2) != cv2.erode(binary, kernel, iterations=2)
    jitter = np.zeros(mask.shape, np.uint8)
    jitter[band] = rng.integers(0, 8, int(band.sum()), dtype=np.uint8)
    return np.where(mask, 255 - jitter, jitter).astype(np.uint8)


# --------------------------------------------------------------------------------------------- writing
def _write(path: Path, array: np.ndarray, params: Optional[list] = None) -> None:
    ok, data = cv2.imencode(path.suffix, array, params or [])
    if not ok:
        raise OSError(f"could not encode '{path}'")
    path.write_bytes(data.tobytes())


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the release's segmentation images are byte-identical to the classification ones
    except OSError:
        shutil.copyfile(src, dst)


def plant_pairs(n_train: int, n_test: int, train_duplicates: int, leaks: int) -> tuple[dict, dict]:
    """({train copy index: train original stem}, {test index: train original stem}), round-robin over the
    classes: a train copy is one of the last images of its class and copies one of the first; a leaked test
    image copies a train image from the middle of its class (never a planted copy or original)."""
    stems = {index: format_name("train", index, label, plane) for index, label, plane in plan_split(n_train, "train")}
    by_class: dict[int, list[int]] = {}
    for index, label, _ in plan_split(n_train, "train"):
        by_class.setdefault(label, []).append(index)
    test_by_class: dict[int, list[int]] = {}
    for index, label, _ in plan_split(n_test, "test"):
        test_by_class.setdefault(label, []).append(index)
    dup, leak = {}, {}
    for k in range(train_duplicates):
        members, slot = by_class[k % len(CLASS_NAMES)], k // len(CLASS_NAMES)
        if slot >= len(members) // 2:
            raise ValueError(f"{train_duplicates} planted train duplicates do not fit {n_train} train images")
        dup[members[-1 - slot]] = members[slot]
    for k in range(leaks):
        label, slot = k % len(CLASS_NAMES), k // len(CLASS_NAMES)
        members, targets = by_class[label], test_by_class[label]
        source = len(members) // 2 + slot
        if slot >= len(targets) or source >= len(members) or members[source] in {*dup, *dup.values()}:
            raise ValueError(f"{leaks} planted leaks do not fit {n_train} train / {n_test} test images")
        leak[targets[slot]] = members[source]
    return {c: stems[o] for c, o in dup.items()}, {t: stems[o] for t, o in leak.items()}


def _copy_sample(root: Path, src_split: str, src_stem: str, label: int, split: str, stem: str) -> None:
    """Write `stem` as a PNG with the decoded pixels of `src_stem`, and a byte copy of its mask."""
    src = root / "classification_task" / src_split / CLASS_NAMES[label] / f"{src_stem}.jpg"
    pixels = cv2.imdecode(np.fromfile(src, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    image_path = root / "classification_task" / split / CLASS_NAMES[label] / f"{stem}.png"
    _write(image_path, pixels)
    if label != NO_TUMOR:
        _link_or_copy(image_path, root / "segmentation_task" / split / "images" / f"{stem}.png")
        shutil.copyfile(root / "segmentation_task" / src_split / "masks" / f"{src_stem}.png",
                        root / "segmentation_task" / split / "masks" / f"{stem}.png")


def write_split(root: Path, split: str, n: int, seed: int, copies: Optional[dict] = None) -> dict[str, str]:
    """Render `split`; `copies` {index: stem of a train image of the same class} are written as pixel
    copies of those. Returns {copy stem: source stem}."""
    copies = copies or {}
    seg_images = root / "segmentation_task" / split / "images"
    seg_masks = root / "segmentation_task" / split / "masks"
    seg_images.mkdir(parents=True)
    seg_masks.mkdir(parents=True)
    for name in CLASS_NAMES:
        (root / "classification_task" / split / name).mkdir(parents=True)
    split_id = {"train": 0, "test": 1}[split]
    planted = {}
    for index, label, plane in plan_split(n, split):
        stem = format_name(split, index, label, plane)
        if index in copies:  # sources come first: train originals precede their copies, train precedes test
            _copy_sample(root, "train", copies[index], label, split, stem)
            planted[stem] = copies[index]
            continue
        rng = np.random.default_rng([seed, split_id, index])
        size = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
        image, mask = render(rng, label, plane, size)
        three_channel = label == NO_TUMOR or rng.random() < 0.5
        pixels = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if three_channel else image
        image_path = root / "classification_task" / split / CLASS_NAMES[label] / f"{stem}.jpg"
        _write(image_path, pixels, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(85, 96))])
        if label != NO_TUMOR:
            _link_or_copy(image_path, seg_images / f"{stem}.jpg")
            _write(seg_masks / f"{stem}.png", ring(rng, mask))
    return planted


def generate(out: Union[str, Path], n_train: int = 400, n_test: int = 100, seed: int = 0, verbose: bool = True,
             train_duplicates: int = 0, leaks: int = 0) -> Path:
    """Write the dataset to `out` (which must not exist yet), atomically; returns `out`. `train_duplicates`
    and `leaks` plant pixel copies inside train and from train into test (see the module docstring)."""
    out = Path(out)
    dup_plan, leak_plan = plant_pairs(n_train, n_test, train_duplicates, leaks)
    if out.exists():
        raise FileExistsError(f"'{out}' already exists; choose another --out or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    start = time.perf_counter()
    try:
        planted = {"train_duplicates": write_split(tmp, "train", n_train, seed, dup_plan),
                   "test_leaks": write_split(tmp, "test", n_test, seed, leak_plan)}
        info = {"generator": "datasets.synthetic", "version": GENERATOR_VERSION, "seed": seed,
                "train": n_train, "test": n_test, "classes": CLASS_NAMES}
        if train_duplicates or leaks:
            info["planted"] = planted
        (tmp / "SYNTHETIC.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, out)
        except OSError:
            if out.is_dir():  # another process finished the same dataset first
                raise FileExistsError(f"'{out}' was created meanwhile by another process") from None
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"wrote synthetic BRISC-layout data to {out}: {n_train} train + {n_test} test images "
              f"(seed {seed}) in {time.perf_counter() - start:.1f} s")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Generate synthetic brain MRI slices in the BRISC 2025 layout.")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--train", type=int, default=400, help="classification images in the train split")
    parser.add_argument("--test", type=int, default=100, help="classification images in the test split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-duplicates", type=int, default=0, help="train images that copy another train image")
    parser.add_argument("--leaks", type=int, default=0, help="test images that copy a train image")
    args = parser.parse_args(argv)
    try:
        generate(args.out, args.train, args.test, args.seed, train_duplicates=args.train_duplicates, leaks=args.leaks)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
