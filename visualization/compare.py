"""The paired-comparison figure: each image's Dice under model A against its Dice under model B."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from visualization.common import PathLike, new_figure, save_figure


def save_paired_dice(dice_a: np.ndarray, dice_b: np.ndarray, name_a: str, name_b: str, title: str,
                     path: PathLike) -> Path:
    """Scatter of per-image Dice (A on x, B on y) with the diagonal: points above it are images B does better."""
    fig = new_figure(5.2, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.6", linewidth=1, linestyle="--", zorder=1)
    better = dice_b > dice_a
    worse = dice_b < dice_a
    for chosen, colour, label in ((better, "tab:blue", f"B better ({int(better.sum())})"),
                                  (worse, "tab:red", f"A better ({int(worse.sum())})"),
                                  (~(better | worse), "0.4", f"equal ({int((~(better | worse)).sum())})")):
        ax.scatter(dice_a[chosen], dice_b[chosen], s=10, alpha=0.6, color=colour, label=label, zorder=2)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel(f"Dice, A: {name_a}")
    ax.set_ylabel(f"Dice, B: {name_b}")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)
