"""The figures of a sweep (`python -m engine.sweep`): tumour Dice against accuracy, and both against CPU latency,
one point per setting."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from visualization.common import PathLike, new_figure, save_figure


def sweep_figure(points: Sequence[dict], title: str = "") -> Figure:
    """Each point: {"name", "accuracy": (mean, std), "dice": (mean, std)} (fractions, shown in %) with error
    bars of one standard deviation over seeds. A setting without a figure is listed in the caption instead."""
    fig = new_figure(7.0, 5.0)
    ax = fig.subplots()
    drawn = [p for p in points if "accuracy" in p and "dice" in p]
    for point in drawn:
        (acc, acc_std), (dice, dice_std) = point["accuracy"], point["dice"]
        ax.errorbar(100 * acc, 100 * dice, xerr=100 * acc_std, yerr=100 * dice_std, fmt="o", capsize=3)
        ax.annotate(point["name"], (100 * acc, 100 * dice), textcoords="offset points", xytext=(4, 4), fontsize=7)
    missing = [p["name"] for p in points if p not in drawn]
    ax.set_xlabel("accuracy (%)")
    ax.set_ylabel("tumour Dice (%)")
    ax.grid(alpha=0.3)
    caption = f"\nnot shown (no accuracy and Dice): {', '.join(missing)}" if missing else ""
    ax.set_title(title + caption, fontsize=9)
    return fig


def save_sweep_figure(points: Sequence[dict], path: PathLike, title: str = "") -> Path:
    return save_figure(sweep_figure(points, title), path)


def latency_figure(points: Sequence[dict], title: str = "") -> Figure:
    """Accuracy and tumour Dice (left, right) against CPU latency at batch 1 (log scale), one point per setting
    with error bars of one standard deviation over seeds; a setting without the figure is left out of a panel."""
    fig = new_figure(11.0, 4.5)
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(axes, ("accuracy", "dice"), ("accuracy (%)", "tumour Dice (%)")):
        drawn = [p for p in points if key in p and "latency_ms" in p]
        for point in drawn:
            mean, std = point[key]
            ax.errorbar(point["latency_ms"], 100 * mean, yerr=100 * std, fmt="o", capsize=3)
            ax.annotate(point["name"], (point["latency_ms"], 100 * mean), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 20, 30, 40 instead of 2x10^1
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("CPU latency, batch 1 (ms per image, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        missing = [p["name"] for p in points if p not in drawn]
        if missing:
            ax.set_title(f"not shown: {', '.join(missing)}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def save_latency_figure(points: Sequence[dict], path: PathLike, title: str = "") -> Path:
    return save_figure(latency_figure(points, title), path)
