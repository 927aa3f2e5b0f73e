"""Intervals, cluster resampling, the paired sign-flip test and Holm, each against an independent reference
(statsmodels, scipy) or simulated coverage."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from evaluation.stats import (bca_interval, clopper_pearson, holm, jackknife_weights, proportion_interval,
                              resample_weights, sign_flip_test)


@pytest.mark.parametrize("k,n", [(35, 35), (0, 40), (17, 40), (990, 1000), (1, 2)])
def test_clopper_pearson_matches_statsmodels_beta(k, n):
    low, high = proportion_confint(k, n, alpha=0.05, method="beta")
    assert clopper_pearson(k, n) == pytest.approx([low, high], abs=1e-10)


def test_thirty_five_of_thirty_five_is_not_a_point():
    low, high = clopper_pearson(35, 35)
    assert round(low, 3) == 0.900 and high == 1.0


@pytest.mark.parametrize("p", [0.5, 0.99])
def test_clopper_pearson_covers_at_least_nominally(p):
    rng = np.random.default_rng(0)
    n, draws = 200, 4000
    successes = rng.binomial(n, p, size=draws)
    covered = np.mean([low <= p <= high for low, high in (clopper_pearson(k, n) for k in successes)])
    assert 0.94 <= covered <= 0.995  # exact: conservative, never far below 95 %


def mean_interval(values: np.ndarray, groups: np.ndarray, resamples: int, seed: int) -> list:
    weights = resample_weights(groups, resamples, seed)
    jack = jackknife_weights(groups)
    return bca_interval(values.mean(), weights @ values / weights.sum(1), jack @ values / jack.sum(1))


def test_bca_matches_scipy_on_skewed_data():
    values = np.random.default_rng(1).beta(8, 2, size=80)  # Dice-like: skewed towards 1
    mine = mean_interval(values, np.arange(80), 20000, 0)
    theirs = scipy_stats.bootstrap((values,), np.mean, method="BCa", n_resamples=20000, random_state=0)
    ci = theirs.confidence_interval
    assert mine == pytest.approx([ci.low, ci.high], abs=0.004)  # Monte Carlo noise of 20000 resamples


def test_bca_covers_dice_like_means():
    rng = np.random.default_rng(2)
    truth = 8 / 10
    covered = [lo <= truth <= hi for lo, hi in
               (mean_interval(rng.beta(8, 2, size=100), np.arange(100), 1000, s) for s in range(400))]
    assert 0.91 <= np.mean(covered) <= 0.985


def test_degenerate_bootstrap_is_no_interval():
    assert bca_interval(1.0, np.ones(100), np.ones(10)) is None


def test_cluster_bootstrap_widens_on_clustered_data_only():
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(40), 10)  # 40 scans of 10 slices
    clustered = np.repeat(rng.normal(0, 1, 40), 10) + rng.normal(0, 0.1, 400)  # slices of a scan alike
    independent = rng.normal(0, 1, 400)
    width = lambda v, g: np.subtract(*mean_interval(v, g, 2000, 0)[::-1])  # noqa: E731
    assert width(clustered, groups) > 2 * width(clustered, np.arange(400))
    assert width(independent, groups) == pytest.approx(width(independent, np.arange(400)), rel=0.25)


def test_clustered_proportion_uses_fewer_effective_trials():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(30), 10)
    success = np.repeat(rng.random(30) < 0.7, 10)  # whole scans right or wrong
    plain, _ = proportion_interval(success)
    grouped, method = proportion_interval(success, groups)
    assert grouped[1] - grouped[0] > 2 * (plain[1] - plain[0]) and "effective" in method


def test_sign_flip_is_exact_for_few_groups_and_respects_groups():
    d = np.array([0.3, 0.2, 0.25, 0.4])  # four groups, all positive: 2 of 16 flips as extreme
    assert sign_flip_test(d) == pytest.approx(2 / 16)
    # the same differences as one scan of four slices: a single group can never reject
    assert sign_flip_test(d, groups=np.zeros(4)) == 1.0
    rng = np.random.default_rng(5)
    null = [sign_flip_test(rng.normal(0, 1, 60), resamples=999, seed=s) for s in range(200)]
    assert 0.02 <= np.mean(np.array(null) < 0.05) <= 0.09


def test_holm_matches_statsmodels():
    p = [0.01, 0.04, 0.03, 0.2, 0.001, 0.04]
    assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))
    assert np.isnan(holm([0.01, float("nan")])[1])


def test_subset_intervals_are_exact_for_proportions_and_degenerate_when_flat():
    from evaluation.bootstrap import bootstrap_intervals, format_interval
    from evaluation.subsets import PerImage

    n = 35
    labels = np.array([0, 1, 3])[np.arange(n) % 3]  # no no_tumor image: every image has a tumour
    native = np.tile([40, 0, 0, 500], (n, 1))  # every mask perfect: Dice 1.0 on every image and resample
    table = PerImage([f"s{i}" for i in range(n)], labels, np.eye(4)[labels], ["ax"] * n, np.ones(n, bool), native,
                     native.copy())
    ci = bootstrap_intervals(table, np.arange(n), 4, resamples=300, seed=0,
                             class_names=["glioma", "meningioma", "no_tumor", "pituitary"])
    assert round(ci["accuracy"][0], 3) == 0.900 and ci["accuracy"][1] == 1.0  # 35 / 35: exact, not [1, 1]
    assert ci["methods"]["accuracy"] == "clopper-pearson" and ci["methods"]["dice"].startswith("bca")
    assert ci["dice"] is None and "dice" in ci["degenerate"] and "accuracy" not in ci["degenerate"]
    assert ci["recall_no_tumor"] is None and ci["empty_fp_rate"] is None  # absent: no interval
    assert format_interval(ci["dice"], "dice", ci) == " [degenerate]"
    assert format_interval(ci["accuracy"], "accuracy", ci) == " [90.00, 100.00]"


def test_interval_widening_script_widens_on_clustered_rows_only():
    """scripts/interval_widening.py: scan-level intervals wider than per-image ones when the slices of a scan
    agree, about equal when every image is its own scan."""
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("interval_widening", REPO / "scripts" / "interval_widening.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rng = np.random.default_rng(0)
    scan_correct = rng.random(40) < 0.8
    scan_dice = rng.uniform(0.4, 0.95, 40)
    clustered = [{"scan_group": g, "correct": int(scan_correct[g]), "true_area": 10, "dice": float(scan_dice[g])}
                 for g in range(40) for _ in range(10)]
    alone = [dict(row, scan_group=k) for k, row in enumerate(clustered)]
    wide, flat = script.widening(clustered, resamples=500), script.widening(alone, resamples=500)
    assert wide["num_groups"] == 40 and flat["num_groups"] == 400
    assert wide["accuracy"]["ratio"] > 2 and wide["dice"]["ratio"] > 2
    assert flat["accuracy"]["ratio"] == pytest.approx(1.0) and 0.8 < flat["dice"]["ratio"] < 1.25
