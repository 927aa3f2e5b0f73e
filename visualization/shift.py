"""The acquisition-shift figure: each headline figure against severity, one line per shift, the suite mean bold."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from visualization.common import PathLike, new_figure, save_figure

HEADLINE_LABELS = (("accuracy", "Accuracy"), ("f1_macro", "Macro-F1"), ("dice", "Dice (tumour, per image)"),
                   ("iou", "IoU (tumour, per image)"))


def shift_figure(result: dict) -> Figure:
    """One panel per headline figure from a shift.json dict: severity 0 is the clean score."""
    severities = result["severities"]
    xs = [0.0] + [float(s) for s in severities]
    fig = new_figure(4.0 * len(HEADLINE_LABELS), 3.8)
    for i, (key, label) in enumerate(HEADLINE_LABELS):
        ax = fig.add_subplot(1, len(HEADLINE_LABELS), i + 1)
        clean = 100 * result["clean"][key]
        for name, by_sev in result["shifted"].items():
            ax.plot(xs, [clean] + [100 * by_sev[s][key] for s in severities], marker="o", markersize=3,
                    linewidth=1.2, label=name)
        ax.plot(xs, [clean] + [100 * result["mean_by_severity"][s][key] for s in severities], color="black",
                linewidth=2.5, label="mean")
        ax.axhline(clean, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(xs, labels=["clean"] + list(severities))
        ax.set_xlabel("severity")
        ax.set_ylabel(f"{label} (%)")
        ax.set_title(f"{label}: drop {100 * result['drop'][key] + 0.0:.1f} pts", fontsize=9)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Acquisition shifts: {result['model']}, {result['split']} split ({result['num_images']} images, "
                 f"{result['image_size']}px)", fontsize=10)
    return fig


def save_shift_figure(result: dict, path: PathLike) -> Path:
    """`shift_figure` saved as a PNG; returns the path."""
    return save_figure(shift_figure(result), path)
