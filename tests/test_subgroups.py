"""Shortcut subgroups (issue 28 item 4): membership, figures with intervals, and exact recomputation from
per_image.csv."""
from __future__ import annotations

import numpy as np
import pytest

from evaluation.per_image import per_image_rows, read_per_image_csv, write_per_image_csv
from evaluation.subgroups import figures_from_rows, file_channels, subgroup_breakdown
from evaluation.subsets import PerImage, subset_figures

CLASSES = ["glioma", "meningioma", "no_tumor", "pituitary"]


def sized_table(n: int = 90, seed: int = 0) -> PerImage:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4)) + 2.5 * np.eye(4)[labels]
    tumour = labels != 2
    tp = np.where(tumour, rng.integers(5, 60, n), 0)
    fn = np.where(tumour, rng.integers(0, 20, n), 0)
    fp = rng.integers(0, 10, n)
    native = np.stack([tp, fp, fn, 1000 - tp - fp - fn], 1)
    distances = np.where(tumour[:, None], rng.uniform(1, 30, (n, 2)), np.nan)
    sides = rng.choice([256, 512, 600], size=(n, 2))
    sides[:n // 2, 1] = sides[:n // 2, 0]  # half square
    return PerImage([f"s{i}" for i in range(n)], labels, logits, ["ax"] * n, np.ones(n, bool), native,
                    native.copy(), distances=distances, sizes=sides.astype(np.float64),
                    channels=rng.choice([1, 3], size=n), groups=np.arange(n) // 2)


def test_subgroups_recompute_exactly_from_per_image_csv(tmp_path):
    table = sized_table()
    index = np.arange(len(table))
    out = subgroup_breakdown(table, index, CLASSES, resamples=200, seed=0)
    write_per_image_csv(per_image_rows(table, {}, CLASSES), tmp_path / "per_image.csv")
    again = figures_from_rows(read_per_image_csv(tmp_path / "per_image.csv"), out["size_cuts"])
    assert set(again) == {"shape", "storage", "size"}
    for proxy, members in again.items():
        for name, figures in members.items():
            mine = out["groups"][proxy][name]
            assert mine["num_images"] == figures["num_images"]
            for key, value in figures.items():
                assert mine[key] == pytest.approx(value, abs=1e-9), (proxy, name, key)


def test_subgroup_membership_and_intervals():
    table = sized_table(120, seed=1)
    out = subgroup_breakdown(table, np.arange(120), CLASSES, resamples=200, seed=0)
    square = table.sizes[:, 0] == table.sizes[:, 1]
    members = np.flatnonzero(square)
    assert out["groups"]["shape"]["square"]["accuracy"] == subset_figures(table, members, CLASSES)["accuracy"]
    assert out["groups"]["storage"]["3_channel"]["num_images"] == int((table.channels == 3).sum())
    assert sum(out["groups"]["size"][t]["num_images"] for t in ("small", "medium", "large")) == 120
    ci = out["groups"]["shape"]["non_square"]["ci95"]
    assert ci["num_groups"] < ci["num_images"]  # scan groups resampled, counted beside the images
    low, high = ci["accuracy"]
    assert low <= out["groups"]["shape"]["non_square"]["accuracy"] <= high


def test_file_channels_reads_the_header(tmp_path):
    import cv2

    grey = np.full((40, 50), 90, np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    cv2.imwrite(str(tmp_path / "c.jpg"), np.dstack([grey] * 3))
    assert file_channels([tmp_path / "g.png", tmp_path / "c.jpg"]).tolist() == [1, 3]


def test_annotate_table_sets_storage_and_scan_groups(planted_root):
    from datasets.duplicates import scan_group_ids
    from datasets.index import index_split
    from evaluation.subgroups import annotate_table

    samples = index_split(planted_root, "test")
    n = len(samples)
    table = sized_table(n)
    annotate_table(table, [s.image for s in samples], scan_group_ids(samples, 0.96))
    assert table.channels.tolist() == file_channels([s.image for s in samples]).tolist()
    assert len(table.groups) == n and len(np.unique(table.groups)) <= n
    with pytest.raises(ValueError, match="image paths"):
        annotate_table(table, [s.image for s in samples[:-1]])


def test_breakdown_figure_draws_the_subgroup_panels():
    from evaluation.breakdowns import breakdowns
    from visualization.breakdowns import breakdown_figure

    table = sized_table(60, seed=2)
    index = np.arange(60)
    subgroups = subgroup_breakdown(table, index, CLASSES, resamples=0)
    fig = breakdown_figure(breakdowns(table, index, CLASSES, ["ax"]), subgroups=subgroups)
    titles = [ax.get_title() for ax in fig.axes]
    assert set(titles[-3:]) == {"file shape", "file size", "file storage"}
    square = subgroups["groups"]["shape"]["square"]["accuracy"]
    panel = fig.axes[titles.index("file shape")]
    assert any(abs(bar.get_height() - 100 * square) < 1e-9 for bar in panel.patches)
