"""Training curves from a run's history: loss terms, accuracy, Dice/IoU per epoch."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Union

from matplotlib.ticker import MaxNLocator

from utils.errors import InputError
from visualization.common import PathLike, new_figure, save_figure


def _is_loss_term(key: str) -> bool:
    """`train/<term>` keys that are loss terms (total, cls, seg*, aux*, *loss*), not accuracy or throughput."""
    if not key.startswith("train/"):
        return False
    term = key.split("/", 1)[1]
    return term in ("total", "loss", "cls") or term.startswith(("seg", "aux")) or "loss" in term


def _quantity(key: str) -> str:
    name = key.split("/", 1)[-1]
    return "total" if key == "val/loss" else name


def _series(history: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for i, row in enumerate(history):
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(row.get("epoch", i + 1))
            ys.append(value)
    return xs, ys


def _load_history(history: Union[list, PathLike]) -> tuple[list[dict], str]:
    if isinstance(history, list):
        return history, ""
    path = Path(history)
    if path.is_dir():
        path = path / "history.json"
    if not path.is_file():
        raise FileNotFoundError(f"training history '{path}' does not exist (train.py writes history.json into "
                                f"each run directory)")
    with open(path, encoding="utf-8") as handle:
        rows = json.load(handle)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"'{path}' must hold a JSON list of per-epoch objects")
    run = path.resolve().parent  # a `latest` link resolves to the timestamped run
    return rows, f"{run.parent.name}/{run.name}"


def plot_training_curves(history: Union[list, PathLike], out_path: PathLike) -> Path:
    """Per-epoch curves from a run's history (list of dicts, `history.json` or its run directory).

    Panels: every `train/*` loss term and `val/loss`; accuracy (and validation macro-F1); validation Dice and
    IoU (and training ones when logged). Returns the PNG path.
    """
    rows, run_name = _load_history(history)
    if not rows:
        raise InputError("the training history is empty: nothing to plot (has an epoch finished?)")
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    loss_keys = [k for k in keys if _is_loss_term(k)] + [k for k in keys if k == "val/loss"]
    panels = [
        ("loss", loss_keys),
        ("accuracy", [k for k in ("train/accuracy", "val/accuracy", "val/f1_macro") if k in keys]),
        ("segmentation (tumour images)", [k for k in ("train/dice", "val/dice", "train/iou", "val/iou")
                                          if k in keys]),
    ]
    fig = new_figure(15, 5.0)
    axes = fig.subplots(1, 3)
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    for ax, (title, series_keys) in zip(axes, panels):
        # One colour per quantity: a training curve and its validation twin share it (val/loss pairs with total).
        quantities = list(dict.fromkeys(_quantity(k) for k in series_keys))
        for key in series_keys:
            xs, ys = _series(rows, key)
            if not xs:
                continue
            style = "--" if key.startswith("val/") else "-"
            width = 2.2 if _quantity(key) == "total" else 1.4
            marker = "o" if len(xs) <= 30 else None
            colour = palette[quantities.index(_quantity(key)) % len(palette)]
            ax.plot(xs, ys, style, color=colour, linewidth=width, marker=marker, markersize=3, label=key)
        values = [v for line in ax.lines for v in line.get_ydata()]
        if title == "loss" and values and min(values) > 0 and max(values) / min(values) > 30:
            ax.set_yscale("log")  # terms of very different size stay readable
        ax.set_title(title + (" (log scale)" if ax.get_yscale() == "log" else ""), fontsize=11)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:  # below the panel, so that no curve is hidden behind it
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    axes[1].set_ylim(top=1.01)
    axes[2].set_ylim(top=1.01)
    fig.suptitle(f"Training curves{f' ({run_name})' if run_name else ''}: solid = training, dashed = validation",
                 fontsize=11)
    return save_figure(fig, out_path)


