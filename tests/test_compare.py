"""Boundary distances, class-mask agreement and gating, and the paired comparison of two test.py results."""
from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.agreement import gate_masks
from evaluation.boundary import boundary_distances, brute_force_distances
from evaluation.compare import mcnemar_exact, paired_interval, wilcoxon_p
from utils.config import ConfigError
from evaluation.subsets import PerImage, contradictions, per_image_overlap, subset_figures

CLASSES = ["glioma", "meningioma", "no_tumor", "pituitary"]
NO_TUMOR = 2


# ------------------------------------------------------------------------------------------ boundary
def test_boundary_distances_of_hand_drawn_shapes():
    # A 3x3 square against its centre pixel: the square's contour is its 8 outer pixels (4 at distance 1,
    # 4 corners at sqrt 2); the centre's nearest contour pixel is at 1.
    truth = np.zeros((9, 9), bool)
    truth[3:6, 3:6] = True
    pred = np.zeros((9, 9), bool)
    pred[4, 4] = True
    hd95, assd = boundary_distances(pred, truth)
    assert hd95 == pytest.approx(math.sqrt(2))
    assert assd == pytest.approx((1 + 4 * 1 + 4 * math.sqrt(2)) / 9)
    # Two single pixels 3 rows and 4 columns apart: 5 pixels; with a (2, 1) spacing sqrt(6^2 + 4^2).
    a, b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a[0, 0], b[3, 4] = True, True
    assert boundary_distances(a, b) == pytest.approx((5.0, 5.0))
    assert boundary_distances(a, b, spacing=(2.0, 1.0)) == pytest.approx((math.sqrt(52),) * 2)


def test_boundary_distances_match_brute_force_pairwise_distances():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :60]
    for _ in range(25):
        masks = []
        for _ in range(2):  # ellipses and rectangles, some touching the image edge
            cy, cx = rng.integers(-5, 53), rng.integers(-5, 65)
            if rng.random() < 0.5:
                masks.append(((yy - cy) / rng.uniform(2, 12)) ** 2 + ((xx - cx) / rng.uniform(2, 15)) ** 2 <= 1)
            else:
                masks.append((abs(yy - cy) <= rng.integers(0, 8)) & (abs(xx - cx) <= rng.integers(0, 10)))
        if not (masks[0].any() and masks[1].any()):
            continue
        assert boundary_distances(*masks) == pytest.approx(brute_force_distances(*masks)), "distances differ"
        spacing = (0.8, 1.3)
        assert boundary_distances(*masks, spacing) == pytest.approx(brute_force_distances(*masks, spacing))


def test_boundary_empty_conventions():
    truth = np.zeros((30, 40), bool)
    truth[5:9, 5:9] = True
    empty = np.zeros_like(truth)
    assert boundary_distances(empty, truth) == (50.0, 50.0)  # missed tumour: the image diagonal
    assert all(math.isnan(v) for v in boundary_distances(truth, empty))  # no tumour: undefined, excluded
    assert all(math.isnan(v) for v in boundary_distances(empty, empty))


def test_boundary_crop_keeps_the_distances_on_native_size_images():
    """The bounding-box crop that keeps 512x512 images cheap leaves every distance unchanged."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:512, :512]
    pairs = []
    for _ in range(100):
        cy, cx, r = rng.integers(100, 400), rng.integers(100, 400), rng.integers(10, 90)
        pairs.append(((yy - cy - 4) ** 2 + (xx - cx + 3) ** 2 < (0.9 * r) ** 2, (yy - cy) ** 2 + (xx - cx) ** 2 < r * r))
    # the crop must not change a distance: checked against the uncropped brute force (a timing-only assert
    # stood here and could not fail on a wrong distance)
    for pred, truth in pairs[:3]:
        assert boundary_distances(pred, truth) == pytest.approx(brute_force_distances(pred, truth))


# ------------------------------------------------------------------------------------------ agreement
def agreement_table() -> PerImage:
    """Six annotated 10x10 images (labels, predictions and masks chosen to cover every case)."""
    labels = np.array([0, 0, 2, 2, 3, 1])
    preds = np.array([0, 2, 2, 2, 2, 1])  # 1, 4: tumour called no_tumor; 3: no_tumor right with a stray mask
    native = np.array([[30, 5, 10, 55], [20, 0, 5, 75], [0, 0, 0, 100], [0, 7, 0, 93], [0, 0, 12, 88],
                       [0, 0, 9, 91]])  # image 5: meningioma right, but the mask is empty
    distances = np.array([[3.0, 1.5], [2.0, 1.0], [np.nan, np.nan], [np.nan, np.nan], [14.1, 14.1], [14.1, 14.1]])
    logits = np.eye(4)[preds] * 5
    return PerImage([f"i{k}" for k in range(6)], labels, logits, ["ax"] * 6, np.ones(6, bool), native,
                    native.copy(), distances=distances, sizes=np.full((6, 2), 10.0))


def test_contradictions_and_gating():
    table = agreement_table()
    before = contradictions(table.preds, table.native, NO_TUMOR)
    assert before.tolist() == [False, True, False, True, False, True]
    figures = subset_figures(table, np.arange(6), CLASSES)
    assert figures["contradiction_rate"] == pytest.approx(3 / 6)
    assert (figures["num_mask_without_tumour_class"], figures["num_tumour_class_without_mask"]) == (2, 1)

    gated = gate_masks(table, NO_TUMOR)
    after = contradictions(gated.preds, gated.native, NO_TUMOR)
    said_none = table.preds == NO_TUMOR
    # Every contradiction of a no_tumor prediction becomes agreement; a tumour class without a mask stays one.
    assert not after[said_none].any() and after[~said_none].tolist() == before[~said_none].tolist()
    assert subset_figures(gated, np.arange(6), CLASSES)["empty_fp_rate"] == 0.0
    # Tumour images whose class is right keep their Dice and distances; a tumour called no_tumor loses its mask.
    dice_before, _ = per_image_overlap(table.native)
    dice_after, _ = per_image_overlap(gated.native)
    right_tumour = (table.labels == table.preds) & (table.labels != NO_TUMOR)
    assert dice_after[right_tumour].tolist() == dice_before[right_tumour].tolist()
    assert np.array_equal(gated.distances[right_tumour], table.distances[right_tumour])
    assert dice_after[1] == 0.0 and gated.distances[1].tolist() == [math.hypot(10, 10)] * 2
    assert (gated.native.sum(1) == table.native.sum(1)).all()  # every pixel still counted once


# ------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("a_only,b_only", [(1, 6), (3, 12), (0, 0), (5, 5)])
def test_mcnemar_exact_on_constructed_tables(a_only, b_only):
    both, neither = 40, 7
    correct_a = np.array([1] * both + [1] * a_only + [0] * b_only + [0] * neither, bool)
    correct_b = np.array([1] * both + [0] * a_only + [1] * b_only + [0] * neither, bool)
    result = mcnemar_exact(correct_a, correct_b)
    assert (result["a_only_correct"], result["b_only_correct"]) == (a_only, b_only)
    n, k = a_only + b_only, min(a_only, b_only)  # exact two-sided binomial p by hand
    expected = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    assert result["p_value"] == pytest.approx(expected)
    from statsmodels.stats.contingency_tables import mcnemar  # a requirement: a missing package fails here

    table = [[both, a_only], [b_only, neither]]
    assert result["p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue)


def test_paired_statistics_of_identical_and_shifted_values():
    a = np.random.default_rng(0).random(50)
    # every resampled difference equal: degenerate, no interval (never a zero-width one)
    assert wilcoxon_p(a, a.copy()) == 1.0 and paired_interval(a, a.copy(), 500, 0) is None
    assert paired_interval(a, a + 0.1, 500, 0) is None
    low, high = paired_interval(a, a + 0.1 + 0.01 * np.random.default_rng(1).random(50), 500, 0)
    assert 0.1 < low < 0.105 < high < 0.11
    assert wilcoxon_p(a, a + 0.1) < 1e-6


def test_boundary_intervals_follow_each_resample():
    """Each bootstrap resample's HD95 / ASSD equal the mean over its drawn tumour images, repeats included."""
    from evaluation.bootstrap import bootstrap_intervals, resample_counts, resampled_figures

    rng = np.random.default_rng(5)
    n = 60
    labels = rng.integers(0, 4, n)
    tumour = labels != NO_TUMOR
    native = np.stack([np.where(tumour, 50, 0), np.full(n, 3), np.where(tumour, 10, 0), np.full(n, 900)], 1)
    distances = np.where(tumour[:, None], rng.uniform(1, 40, (n, 2)), np.nan)
    table = PerImage([f"s{i}" for i in range(n)], labels, np.eye(4)[labels], ["ax"] * n, np.ones(n, bool), native,
                     native.copy(), distances=distances, sizes=np.full((n, 2), 30.0))
    index = np.arange(5, n)
    counts = resample_counts(len(index), 20, seed=2)
    figures = resampled_figures(table, index, counts, 4)
    draws = np.random.default_rng(2).integers(0, len(index), size=(20, len(index)))
    for b in (0, 11, 19):
        chosen = distances[index[draws[b]]]
        chosen = chosen[np.isfinite(chosen[:, 0])]
        assert figures["hd95"][b] == pytest.approx(chosen[:, 0].mean())
        assert figures["assd"][b] == pytest.approx(chosen[:, 1].mean())
    point = subset_figures(table, index, CLASSES)
    interval = bootstrap_intervals(table, index, 4, resamples=300, seed=0)
    assert interval["hd95"][0] <= point["hd95"] <= interval["hd95"][1]


def test_scan_groups_switch_to_the_cluster_test_and_holm_covers_the_subgroups():
    from evaluation.compare import adjust_holm, paired_figures, scan_groups_of, subgroup_comparisons
    from evaluation.stats import holm

    rng = np.random.default_rng(7)
    stems = [f"s{i:02d}" for i in range(48)]
    rows = []
    for shift in (0.0, 0.05):
        rows.append({s: {"stem": s, "correct": float(rng.random() < 0.8 + shift), "true_area": 100.0,
                         "dice": 0.7 + shift + 0.05 * rng.random(), "iou": 0.6 + shift, "hd95": None, "assd": None,
                         "width": 512.0, "height": 512.0 if i % 2 else 400.0, "scan_group": float(i // 4)}
                     for i, s in enumerate(stems)})
    groups = scan_groups_of(rows[0], stems)
    assert len(np.unique(groups)) == 12
    result = {"figures": paired_figures(rows, stems, groups, 300, 0),
              "subgroups": subgroup_comparisons(rows, stems, groups, 300, 0)}
    adjust_holm(result)
    assert result["figures"]["dice"]["test"].startswith("cluster sign-flip") and result["figures"]["dice"][
        "num_groups"] == 12
    assert {"shape:square", "shape:non_square", "size:small"} <= set(result["subgroups"])
    family = list(result["figures"].values()) + [f for g in result["subgroups"].values() for f in g.values()]
    assert [f["p_holm"] for f in family] == pytest.approx(holm([f["p_value"] for f in family]))
    ungrouped = paired_figures(rows, stems, None, 300, 0)
    assert ungrouped["accuracy"]["test"] == "McNemar exact" and ungrouped["dice"]["test"] == "Wilcoxon"


def test_two_results_on_another_dataset_compare_in_its_label_space(tmp_path):
    """per_image.csv of `test.py --data-format` carries true_label / pred_label (text) and no masks."""
    import csv as _csv
    import json as _json

    from evaluation.compare import compare as _compare

    folders = []
    for name, correct in (("a", [1, 0, 0, 1, 0, 1]), ("b", [1, 1, 1, 1, 0, 1])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "metrics.json").write_text(_json.dumps({"split": "test", "resolution": "native", "tta": False,
                                                          "gate_masks": False, "threshold": None, "model": name}))
        with open(folder / "per_image.csv", "w", newline="") as handle:
            writer = _csv.DictWriter(handle, fieldnames=["stem", "subset", "true_label", "pred_label", "correct",
                                                         "true_area"])
            writer.writeheader()
            for k, c in enumerate(correct):
                writer.writerow({"stem": f"s{k}", "subset": "leak_free", "true_label": "glioma" if k % 2 else "normal",
                                 "pred_label": "x", "correct": c, "true_area": ""})
        folders.append(folder)
    result = _compare(folders, "leak_free", resamples=200)
    assert result["figures"]["accuracy"]["difference"] == pytest.approx(2 / 6)
    assert set(result["figures"]) == {"accuracy"}
    # a classification-only result (no masks: threshold None) pairs with a multi-task one on the class figures
    meta = _json.loads((folders[1] / "metrics.json").read_text())
    (folders[1] / "metrics.json").write_text(_json.dumps({**meta, "threshold": 0.5}))
    assert _compare(folders, "leak_free", resamples=200)["figures"]["accuracy"]["difference"] == pytest.approx(2 / 6)
    (folders[0] / "metrics.json").write_text(_json.dumps({**meta, "model": "a", "threshold": 0.4}))
    with pytest.raises(ConfigError, match="differ in threshold"):
        _compare(folders, "leak_free", resamples=200)
