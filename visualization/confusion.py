"""The confusion matrix figure (counts or row-normalised)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
from matplotlib.figure import Figure

from datasets.naming import CLASS_NAMES
from visualization.common import PathLike, new_figure, save_figure


def confusion_matrix_figure(cm: Union[list, np.ndarray], class_names: Sequence[str] = CLASS_NAMES,
                            normalize: bool = False) -> Figure:
    """A confusion matrix (rows: true class, columns: predicted class) as a matplotlib Figure.

    With `normalize`, cells show the share of each true class (row-normalised, i.e. recall on the diagonal)
    above the count; otherwise the counts, coloured by the row share.
    """
    counts = np.asarray(cm, dtype=np.float64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not fit {k} class names")
    row_sums = counts.sum(1, keepdims=True)
    shares = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)
    size = 1.1 * k + 2.2
    fig = new_figure(size + 0.8, size)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            text = f"{shares[i, j]:.1%}\n({int(counts[i, j])})" if normalize else f"{int(counts[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="white" if shares[i, j] > 0.55 else "black")
    ax.set_xticks(range(k), labels=list(class_names), rotation=30, ha="right")
    ax.set_yticks(range(k), labels=list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(counts.sum())
    correct = int(np.trace(counts))
    ax.set_title(f"Confusion matrix: {total} images, accuracy {correct / max(total, 1):.2%}", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class", fontsize=8)
    return fig


def save_confusion_matrix(cm: Union[list, np.ndarray], class_names: Sequence[str], path: PathLike,
                          normalize: bool = False) -> Path:
    """`confusion_matrix_figure` saved as a PNG; returns the path."""
    return save_figure(confusion_matrix_figure(cm, class_names, normalize), path)


