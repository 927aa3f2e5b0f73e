"""Figures of test.py's breakdowns: the reliability diagram and the headline figures per plane / class / size."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure

from visualization.common import PathLike, new_figure, save_figure


def reliability_figure(bins: list[dict], ece: float, title: str = "") -> Figure:
    """Accuracy against mean confidence per confidence bin (bars) with the diagonal of perfect calibration;
    the bin counts below. `bins` as written by `evaluation.calibration.reliability_bins`."""
    fig = new_figure(5.0, 5.6)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    centres = np.array([(b["low"] + b["high"]) / 2 for b in bins])
    width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
    accuracy = np.array([np.nan if b["accuracy"] is None else b["accuracy"] for b in bins])
    confidence = np.array([np.nan if b["confidence"] is None else b["confidence"] for b in bins])
    top.bar(centres, np.nan_to_num(accuracy), width=width * 0.95, color="#4c72b0", label="accuracy in bin")
    top.scatter(centres, confidence, color="#dd8452", s=14, zorder=3, label="mean confidence in bin")
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(fontsize=8, loc="upper left")
    top.set_title(f"{title + ': ' if title else ''}ECE {100 * ece:.2f} % ({len(bins)} bins)", fontsize=10)
    bottom.bar(centres, [b["count"] for b in bins], width=width * 0.95, color="#8c8c8c")
    bottom.set_yscale("symlog")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("images")
    return fig


def breakdown_figure(breakdown: dict, title: str = "", subgroups: Optional[dict] = None) -> Figure:
    """One panel per grouping (plane, class, tumour-size tercile and, with `subgroups` from
    evaluation.subgroups.subgroup_breakdown, file shape, storage and file-size tercile): accuracy and tumour
    Dice per group, in %; an absent figure gets no bar."""
    groups = [(name, breakdown.get(name) or {}) for name in ("plane", "class", "tumour_size")]
    for proxy, members in ((subgroups or {}).get("groups") or {}).items():
        groups.append((f"file {proxy}", {name: figures for name, figures in members.items()
                                         if figures.get("num_images")}))
    fig = new_figure(4.0 * len(groups), 3.8)
    axes = fig.subplots(1, len(groups), sharey=True)
    for ax, (grouping, members) in zip(axes, groups):
        names = list(members)
        x = np.arange(len(names))
        for offset, key, colour in ((-0.2, "accuracy", "#4c72b0"), (0.2, "dice", "#dd8452")):
            values = [100 * members[n][key] if members[n].get(key) is not None else np.nan for n in names]
            if all(np.isnan(values)):  # a task the run does not have: no bars rather than zeros
                continue
            present = ~np.isnan(values)  # an absent figure (None: e.g. no_tumor's tumour Dice) gets no bar, not 0
            bars = ax.bar(x[present] + offset, np.asarray(values)[present], width=0.38, color=colour, label=key)
            for bar, value in zip(bars, np.asarray(values)[present]):
                ax.text(bar.get_x() + bar.get_width() / 2, value + 1, f"{value:.1f}", ha="center", fontsize=7)
            for position in x[~present]:
                ax.text(position + offset, 1, "–", ha="center", fontsize=8, color=colour)
        labels = [f"{n}\n({members[n].get('num_images', 0)})" for n in names]
        ax.set_xticks(x, labels=labels, fontsize=8)
        ax.set_title(grouping.replace("_", " "), fontsize=10)
        ax.set_ylim(0, 110)
    axes[0].set_ylabel("%  (accuracy; tumour Dice, per image)")
    axes[0].legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_breakdown_figures(calibration: Optional[dict], breakdown: dict, out_dir: PathLike, title: str = "",
                           subgroups: Optional[dict] = None) -> list[Path]:
    """`reliability.png` (when calibration bins are given) and `breakdowns.png` in `out_dir` (with the shortcut
    subgroups' panels when `subgroups` is given)."""
    out_dir = Path(out_dir)
    written = [save_figure(breakdown_figure(breakdown, title, subgroups), out_dir / "breakdowns.png")]
    if calibration:
        written.append(save_figure(reliability_figure(calibration["bins"], calibration["ece"], title),
                                   out_dir / "reliability.png"))
    return written
