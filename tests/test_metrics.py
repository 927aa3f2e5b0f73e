"""MultiTaskMetrics against scikit-learn and hand-computed examples; accumulation, merging, distributed sync."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn import metrics as skm

from evaluation.metrics import METRIC_DEFINITIONS_MD, MultiTaskMetrics

torch.set_num_threads(1)

NAMES = ["glioma", "meningioma", "no_tumor", "pituitary"]
LABELS = list(range(4))


def random_batch(batch: int, seed: int, size: int = 8, never_predict: int | None = None) -> tuple[dict, dict]:
    """Random logits and masks; about a third of the masks empty, one image without an annotation."""
    gen = torch.Generator().manual_seed(seed)
    cls = torch.randn(batch, 4, generator=gen)
    if never_predict is not None:
        cls[:, never_predict] = -100.0
    mask = (torch.rand(batch, 1, size, size, generator=gen) > 0.6).float()
    mask[torch.rand(batch, generator=gen) < 0.35] = 0
    seg = torch.randn(batch, 1, size, size, generator=gen) + (mask * 2 - 1)  # correlated with the truth
    has_mask = torch.ones(batch, dtype=torch.bool)
    has_mask[0] = False
    data = {"label": torch.randint(0, 4, (batch,), generator=gen), "mask": mask, "has_mask": has_mask,
            "id": [f"s{seed}_{i}" for i in range(batch)]}
    return {"cls": cls, "seg": seg}, data


def run(batches: list[tuple[dict, dict]], **kwargs) -> MultiTaskMetrics:
    metrics = MultiTaskMetrics(4, NAMES, **kwargs)
    for outputs, data in batches:
        metrics.update(outputs, data)
    return metrics


def assert_same_results(a: dict, b: dict, tol: float = 1e-12) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], abs=tol), key
        else:
            assert a[key] == b[key], key


# --------------------------------------------------------------------------------------------- classification
@pytest.mark.parametrize("never_predict", [None, 3])
def test_classification_figures_match_scikit_learn(never_predict):
    batches = [random_batch(n, seed, never_predict=never_predict) for seed, n in enumerate([37, 50, 13, 100])]
    results = run(batches).compute()
    y_true = torch.cat([data["label"] for _, data in batches]).numpy()
    y_pred = torch.cat([out["cls"].argmax(1) for out, _ in batches]).numpy()

    assert results["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-6)
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=LABELS, average=average,
                                                         zero_division=0)
        assert results[f"precision_{average}"] == pytest.approx(p, abs=1e-6)
        assert results[f"recall_{average}"] == pytest.approx(r, abs=1e-6)
        assert results[f"f1_{average}"] == pytest.approx(f, abs=1e-6)
    # per class, a zero denominator (class absent / never predicted) is no figure: None here, NaN in sklearn
    p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=LABELS, zero_division=np.nan)
    for c, name in enumerate(NAMES):
        for key, theirs in (("precision", p[c]), ("recall", r[c]), ("f1", f[c])):
            mine = results[f"{key}_{name}"]
            assert (mine is None) == bool(np.isnan(theirs)) and (mine is None or mine == pytest.approx(theirs))
    assert results["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=LABELS).tolist()
    assert results["num_images"] == len(y_true)
    if never_predict is not None:
        assert results[f"precision_{NAMES[never_predict]}"] is None  # never predicted: no precision, not 0


def test_classification_report_is_scikit_learns():
    batches = [random_batch(40, seed) for seed in range(3)]
    metrics = run(batches)
    y_true = torch.cat([data["label"] for _, data in batches]).numpy()
    y_pred = torch.cat([out["cls"].argmax(1) for out, _ in batches]).numpy()
    expected = skm.classification_report(y_true, y_pred, labels=LABELS, target_names=NAMES, digits=4,
                                         zero_division=0)
    assert metrics.classification_report(digits=4) == expected
    with pytest.raises(RuntimeError, match="no images"):
        MultiTaskMetrics(4, NAMES).classification_report()


# --------------------------------------------------------------------------------------------- segmentation
def square(cells: list[tuple[int, int]]) -> torch.Tensor:
    out = torch.zeros(1, 1, 4, 4)
    for row, col in cells:
        out[0, 0, row, col] = 1
    return out


def hand_example() -> tuple[dict, dict]:
    """Four annotated 4x4 images (64 pixels) and one without an annotation.

    A partial overlap: truth 4 px, prediction 4 px, 2 shared -> TP 2, FP 2, FN 2, TN 10 (Dice 1/2, IoU 1/3)
    B empty truth, empty prediction -> TN 16
    C empty truth, 3 px predicted -> FP 3, TN 13
    D full miss: truth 2 px, nothing predicted -> FN 2, TN 14
    E has_mask False, with a prediction that would otherwise count
    Totals: TP 2, FP 5, FN 4, TN 53.
    """
    truth = torch.cat([square([(0, 0), (0, 1), (1, 0), (1, 1)]), square([]), square([]), square([(3, 3), (3, 2)]),
                       square([(2, 2)])])
    pred = torch.cat([square([(0, 0), (0, 1), (2, 0), (2, 1)]), square([]), square([(1, 1), (1, 2), (1, 3)]),
                      square([]), square([(0, 0)])])
    outputs = {"cls": torch.eye(4)[[0, 2, 2, 1, 3]] * 5, "seg": (pred * 2 - 1) * 3}
    data = {"label": torch.tensor([0, 2, 2, 1, 3]), "mask": truth,
            "has_mask": torch.tensor([True, True, True, True, False]), "id": list("ABCDE")}
    return outputs, data


def test_hand_computed_segmentation_figures():
    results = run([hand_example()]).compute()
    tp, fp, fn, tn = 2, 5, 4, 53
    expected = {
        "dice": (0.5 + 0.0) / 2, "iou": (1 / 3 + 0.0) / 2,
        "dice_global": 2 * tp / (2 * tp + fp + fn), "iou_global": tp / (tp + fp + fn),
        "dice_2class": (4 / 13 + 106 / 115) / 2, "miou_2class": (2 / 11 + 53 / 62) / 2,
        "dice_all_images": (0.5 + 1 + 0 + 0) / 4, "iou_all_images": (1 / 3 + 1 + 0 + 0) / 4,
        "pixel_accuracy": 55 / 64, "sensitivity": 2 / 6, "specificity": 53 / 58, "empty_fp_rate": 1 / 2,
    }
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-12), key
    assert (results["num_images"], results["num_seg_images"], results["num_tumour_images"],
            results["num_empty_images"]) == (5, 4, 2, 2)
    assert results["accuracy"] == 1.0


def test_per_image_records_follow_the_same_conventions():
    metrics = run([hand_example()], keep_per_image=True)
    records = {r["id"]: r for r in metrics.per_image_records()}
    assert records["A"]["dice"] == pytest.approx(0.5) and records["A"]["iou"] == pytest.approx(1 / 3)
    assert records["B"]["dice"] == 1.0 and records["C"]["dice"] == 0.0 and records["D"]["dice"] == 0.0
    assert records["E"]["dice"] is None and records["E"]["tumour_pixels"] is None
    assert [records[i]["tumour_pixels"] for i in "ABCD"] == [4, 0, 0, 2]
    assert [records[i]["pred_pixels"] for i in "ABCDE"] == [4, 0, 3, 0, 1]
    assert all(r["label"] == r["pred"] for r in records.values())
    assert records["A"]["prob"] == pytest.approx(math.exp(5) / (math.exp(5) + 3))
    with pytest.raises(RuntimeError, match="keep_per_image"):
        run([hand_example()]).per_image_records()


def test_pixel_figures_match_scikit_learn_on_random_masks():
    batches = [random_batch(n, seed, size=12) for seed, n in enumerate([9, 16, 5])]
    results = run(batches).compute()
    keep = torch.cat([data["has_mask"] for _, data in batches])
    truth = torch.cat([data["mask"] for _, data in batches])[keep].flatten(1).bool()
    pred = (torch.sigmoid(torch.cat([out["seg"] for out, _ in batches])) >= 0.5)[keep].flatten(1)
    t, p = truth.flatten().numpy(), pred.flatten().numpy()
    assert results["dice_global"] == pytest.approx(skm.f1_score(t, p), abs=1e-9)
    assert results["iou_global"] == pytest.approx(skm.jaccard_score(t, p), abs=1e-9)
    assert results["miou_2class"] == pytest.approx(skm.jaccard_score(t, p, average="macro"), abs=1e-9)
    assert results["dice_2class"] == pytest.approx(skm.f1_score(t, p, average="macro"), abs=1e-9)
    assert results["pixel_accuracy"] == pytest.approx(skm.accuracy_score(t, p), abs=1e-9)
    assert results["sensitivity"] == pytest.approx(skm.recall_score(t, p), abs=1e-9)
    assert results["specificity"] == pytest.approx(skm.recall_score(t, p, pos_label=0), abs=1e-9)

    tumour = truth.any(1)
    per_image_dice = [skm.f1_score(ti.numpy(), pi.numpy()) for ti, pi in zip(truth[tumour], pred[tumour])]
    per_image_iou = [skm.jaccard_score(ti.numpy(), pi.numpy()) for ti, pi in zip(truth[tumour], pred[tumour])]
    assert results["dice"] == pytest.approx(np.mean(per_image_dice), abs=1e-9)
    assert results["iou"] == pytest.approx(np.mean(per_image_iou), abs=1e-9)
    assert results["empty_fp_rate"] == pytest.approx(pred[~tumour].any(1).float().mean().item(), abs=1e-9)
    assert results["num_tumour_images"] == int(tumour.sum()) and results["num_empty_images"] == int((~tumour).sum())


def test_threshold_applies_to_the_sigmoid_probability():
    data = {"label": torch.tensor([0]), "mask": torch.ones(1, 1, 1, 2)}
    outputs = {"cls": torch.zeros(1, 4), "seg": torch.logit(torch.tensor([[[[0.65, 0.75]]]]))}
    assert run([(outputs, data)], threshold=0.7).compute()["sensitivity"] == 0.5
    assert run([(outputs, data)], threshold=0.5).compute()["sensitivity"] == 1.0
    with pytest.raises(ValueError, match="threshold"):
        MultiTaskMetrics(4, NAMES, threshold=1.0)


# --------------------------------------------------------------------------------------------- accumulation
def concat(batches: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    outputs = {key: torch.cat([out[key] for out, _ in batches]) for key in ("cls", "seg")}
    data = {key: torch.cat([d[key] for _, d in batches]) for key in ("label", "mask", "has_mask")}
    data["id"] = [i for _, d in batches for i in d["id"]]
    return outputs, data


def test_accumulating_batches_equals_one_big_batch():
    batches = [random_batch(n, seed) for seed, n in enumerate([7, 1, 30, 12])]
    assert_same_results(run(batches).compute(), run([concat(batches)]).compute())


def test_merging_two_objects_equals_one_over_the_union_and_reset_clears():
    batches = [random_batch(n, seed) for seed, n in enumerate([11, 20, 6, 9])]
    first, second = run(batches[:2], keep_per_image=True), run(batches[2:], keep_per_image=True)
    union = run(batches, keep_per_image=True)
    merged = first.merge(second)
    assert_same_results(merged.compute(), union.compute())
    assert merged.per_image_records() == union.per_image_records()
    assert_same_results(MultiTaskMetrics(4, NAMES).merge(second).compute(), second.compute())

    merged.reset()
    empty = merged.compute()
    assert empty["num_images"] == 0 and empty["accuracy"] == 0.0 and empty["dice"] is None  # no tumour: no Dice
    assert merged.per_image_records() == []
    with pytest.raises(ValueError, match="same number of classes"):
        merged.merge(MultiTaskMetrics(3, NAMES[:3]))


def test_shape_mismatch_is_reported():
    outputs, data = random_batch(2, 0)
    outputs["seg"] = outputs["seg"][..., :4, :4]
    with pytest.raises(ValueError, match="mask's size"):
        MultiTaskMetrics(4, NAMES).update(outputs, data)


# --------------------------------------------------------------------------------------------- distributed
def _rank_worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        batches = [random_batch(n, seed) for seed, n in enumerate([7, 1, 30, 12, 5])]
        metrics = run(batches[rank::world_size], keep_per_image=True)
        metrics.sync()
        if rank == 0:
            torch.save({"results": metrics.compute(), "records": metrics.per_image_records()}, out_file)
        try:
            metrics.sync()
        except RuntimeError:
            pass
        else:
            raise AssertionError("a second sync() must be refused")
    finally:
        dist.destroy_process_group()


def test_sync_across_two_ranks_equals_a_single_process(tmp_path):
    out_file = str(tmp_path / "rank0.pt")
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), out_file), nprocs=2, join=True)
    saved = torch.load(out_file, weights_only=True)
    batches = [random_batch(n, seed) for seed, n in enumerate([7, 1, 30, 12, 5])]
    single = run(batches, keep_per_image=True)
    assert_same_results(saved["results"], single.compute())
    assert sorted(r["id"] for r in saved["records"]) == sorted(r["id"] for r in single.per_image_records())


# --------------------------------------------------------------------------------------------- documentation
def test_every_documented_key_is_computed_and_every_figure_documented():
    results = run([hand_example()]).compute()
    documented = set(re.findall(r"`([a-z0-9_<>]+)`", METRIC_DEFINITIONS_MD))
    per_class = {f"{metric}_{name}" for metric in ("precision", "recall", "f1") for name in NAMES}
    for key in documented:
        if "<" not in key and key not in ("has_mask",):
            assert key in results, key
    for key in set(results) - per_class:
        assert key in documented, key


def test_macro_averages_skip_classes_absent_from_truth_and_predictions():
    """A subset that holds two of the four classes (e.g. the leaked images) is averaged over those two, as
    scikit-learn does by default, instead of counting the absent classes as F1 = 0."""
    from evaluation.metrics import classification_figures

    y_true = [1, 1, 3, 3, 3]
    y_pred = [1, 3, 3, 3, 3]
    confusion = skm.confusion_matrix(y_true, y_pred, labels=[0, 1, 2, 3]).tolist()
    figures = classification_figures(confusion, ["a", "b", "c", "d"])
    assert figures["f1_macro"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"), abs=1e-12)
    assert figures["precision_macro"] == pytest.approx(skm.precision_score(y_true, y_pred, average="macro"), abs=1e-12)
    assert figures["recall_macro"] == pytest.approx(skm.recall_score(y_true, y_pred, average="macro"), abs=1e-12)
