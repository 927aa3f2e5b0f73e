"""What every figure shares: Agg figures without pyplot state, saving, de-normalised images, mask painting,
and reading labels and ids from a dataset without decoding images."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


PathLike = Union[str, Path]
ArrayLike = Union[torch.Tensor, np.ndarray]

GT_COLOUR = (0.1, 0.85, 0.2)
PRED_COLOUR = (0.95, 0.15, 0.1)
DPI = 120


def denormalize(images: torch.Tensor, mean: list, std: list) -> torch.Tensor:
    """Normalised (B, C, H, W) images back to [0, 1], replicated to 3 channels for display."""
    channels = images.shape[1]
    mean_t = torch.tensor(mean[:channels] if channels == len(mean) else [sum(mean) / len(mean)] * channels)
    std_t = torch.tensor(std[:channels] if channels == len(std) else [sum(std) / len(std)] * channels)
    out = images.float().cpu() * std_t.view(1, -1, 1, 1) + mean_t.view(1, -1, 1, 1)
    out = out.clamp(0, 1)
    return out.repeat(1, 3, 1, 1) if channels == 1 else out


def overlay(images: torch.Tensor, masks: torch.Tensor, colour: tuple[float, float, float], alpha: float = 0.45
            ) -> torch.Tensor:
    """Paint binary (B, 1, H, W) masks over [0, 1] RGB images."""
    tint = torch.tensor(colour).view(1, 3, 1, 1)
    masks = masks.float().cpu()
    return images * (1 - alpha * masks) + tint * alpha * masks


def new_figure(width: float, height: float, layout: Optional[str] = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def display_images(images: ArrayLike, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (N, C, H, W) images -> (N, H, W, 3) float RGB in [0, 1]."""
    batch = torch.as_tensor(images).detach().cpu().float()
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(batch.shape)}")
    return denormalize(batch, list(mean), list(std)).permute(0, 2, 3, 1).numpy()


def binary_masks(masks: ArrayLike, count: int, name: str, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """(N, 1, H, W) or (N, H, W) masks or probabilities -> (N, H, W) bool (threshold 0.5).

    `size`, when given, is the (H, W) the masks must have (that of the images they are drawn on)."""
    array = torch.as_tensor(masks).detach().cpu().float().numpy()
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[0] != count:
        raise ValueError(f"{name}: expected {count} masks of shape (N, 1, H, W) or (N, H, W), got {array.shape}")
    if size is not None and tuple(array.shape[1:]) != tuple(size):
        raise ValueError(f"{name}: masks of size {tuple(array.shape[1:])} do not match images of size {tuple(size)}")
    return array >= 0.5


def plain_axis(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def paint_mask(ax, mask: np.ndarray, colour: tuple, alpha: float = 0.35, fill: bool = True,
                linestyle: str = "-") -> None:
    """A binary mask as a translucent fill and its outline."""
    if fill:
        rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
        rgba[mask] = (*colour, alpha)
        ax.imshow(rgba, interpolation="nearest")
    if mask.any() and not mask.all():  # a contour needs both sides of the level
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.2, linestyles=linestyle)


def wrap_text(text: str, width: int = 28) -> str:
    # Long tokens (file stems) stay whole: a broken id is harder to read than a wide title.
    return "\n".join(textwrap.fill(line, width, break_long_words=False, break_on_hyphens=False)
                     for line in text.split("\n"))



def jet_mappable():
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    # OpenCV's COLORMAP_JET (used by the overlays) and matplotlib's "jet" are the same ramp.
    return ScalarMappable(norm=Normalize(0, 1), cmap=colormaps["jet"])


def dataset_labels(dataset) -> list[int]:
    """Class label of every sample, read from the index when the dataset exposes one (no image decoding)."""
    return [int(v) for v in _sample_field(dataset, "label")]


def dataset_ids(dataset) -> list[str]:
    """File stem of every sample, read from the index when the dataset exposes one (no image decoding)."""
    return [str(v) for v in _sample_field(dataset, "id")]


def _sample_field(dataset, key: str) -> list:
    indices = None
    base = dataset
    if isinstance(dataset, torch.utils.data.Subset):
        indices, base = list(dataset.indices), dataset.dataset
    samples = getattr(base, "samples", None)
    attr = "stem" if key == "id" else key
    if samples is not None and len(samples) == len(base) and all(hasattr(s, attr) for s in samples[:1]):
        values = [getattr(s, attr) for s in samples]
        return values if indices is None else [values[i] for i in indices]
    return [_as_scalar(dataset[i][key]) for i in range(len(dataset))]  # generic dataset: read every sample


def _as_scalar(value):
    return value.item() if torch.is_tensor(value) else value


def spread_indices(candidates: Sequence[int], count: int) -> list[int]:
    """`count` entries spread evenly over `candidates` (all of them when there are fewer): deterministic."""
    if count >= len(candidates):
        return list(candidates)
    positions = np.linspace(0, len(candidates) - 1, count).round().astype(int)
    return [candidates[p] for p in positions]

