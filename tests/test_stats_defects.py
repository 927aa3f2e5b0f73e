"""The scoring defects of issue 27, each with a test that failed on the old code."""
from __future__ import annotations


import numpy as np
import pytest
from sklearn.metrics import f1_score

from datasets.index import Sample
from evaluation.breakdowns import breakdowns
from evaluation.conventions import setting_label, setting_of
from evaluation.subsets import PerImage

CLASSES = ["glioma", "meningioma", "no_tumor", "pituitary"]


def table_of(labels, preds) -> PerImage:
    n = len(labels)
    native = np.tile([5, 1, 1, 50], (n, 1))
    native[np.array(labels) == 2] = [0, 0, 0, 57]  # no tumour: an empty truth
    return PerImage([f"s{i}" for i in range(n)], np.array(labels), np.eye(4)[preds], ["ax"] * n,
                    np.ones(n, bool), native, native.copy())


def test_class_f1_counts_false_positives_from_other_classes():
    labels = [0] * 10 + [1] * 6 + [3] * 4
    preds = [0] * 10 + [0] * 6 + [3] * 4  # glioma recall 1.0, six meningiomas called glioma
    out = breakdowns(table_of(labels, preds), np.arange(20), CLASSES, ["ax"])
    assert out["class"]["glioma"]["accuracy"] == 1.0
    expected = f1_score(labels, preds, labels=[0], average=None)[0]
    assert out["class"]["glioma"]["f1"] == pytest.approx(expected) == pytest.approx(0.769, abs=1e-3)


def test_setting_label_names_mask_gating():
    base = {"split": "test", "threshold": 0.5, "tta": False, "resolution": "native"}
    gated, ungated = setting_of({**base, "gate_masks": True}), setting_of(base)
    assert setting_label(gated) != setting_label(ungated) and "gated" in setting_label(gated)


def test_leak_check_uses_and_records_the_configured_threshold(monkeypatch, tmp_path):
    import evaluation.leaks as leaks

    seen = {}

    def fake_leaked(eval_samples, train_samples, near_threshold=0.99, cache_dir=None):
        seen["near_threshold"] = near_threshold
        return {}

    monkeypatch.setattr(leaks, "leaked_stems", fake_leaked)
    sample = Sample(stem="a", label=0, plane="ax", image=tmp_path / "a.jpg", mask=None)
    _, info = leaks.leak_check(tmp_path, "test", tmp_path / "split.json", [sample],
                               index=lambda root, split: [sample], near_threshold=0.97)
    assert seen["near_threshold"] == 0.97 and info["near_threshold"] == 0.97


def test_absent_class_is_none_not_zero_and_draws_no_bar():
    from evaluation.metrics import classification_figures
    from visualization.breakdowns import breakdown_figure

    figures = classification_figures([[5, 0, 0, 0], [1, 4, 0, 0], [0, 0, 3, 0], [0, 0, 0, 0]], CLASSES)
    assert figures["recall_pituitary"] is None and figures["precision_pituitary"] is None
    assert figures["f1_pituitary"] is None and figures["recall_glioma"] == 1.0
    labels, preds = [0, 0, 2, 2], [0, 0, 2, 2]
    out = breakdowns(table_of(labels, preds), np.arange(4), CLASSES, ["ax"])
    fig = breakdown_figure(out)
    heights = [bar.get_height() for ax in fig.axes for bar in ax.patches]
    assert 0.0 not in heights  # no_tumor's Dice (no tumour image) is absent, not a 0.0 bar


def test_a_class_absent_from_the_truth_has_no_f1_even_when_predicted():
    """The pituitary rows of PMRAM's leak-free subset: no pituitary image, some predicted pituitary: F1 is
    undefined (–), not 0; a class in the truth that is never predicted keeps F1 0."""
    from evaluation.metrics import classification_figures

    # rows: truth glioma, meningioma, pituitary; columns: predictions
    confusion = [[3, 1, 1], [0, 2, 0], [0, 0, 0]]
    figures = classification_figures(confusion, ["glioma", "meningioma", "pituitary"])
    assert figures["f1_pituitary"] is None and figures["recall_pituitary"] is None
    assert figures["precision_pituitary"] == 0.0  # predicted once, never right
    never_predicted = classification_figures([[2, 0], [1, 0]], ["a", "b"])
    assert never_predicted["f1_b"] == 0.0
