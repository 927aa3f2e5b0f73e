"""Statistical primitives of the reports: exact binomial intervals, BCa bootstrap, cluster (scan-level)
resampling weights, a cluster-respecting paired test, and Holm's adjustment.

- `clopper_pearson(k, n)`: the exact (Clopper–Pearson) interval of a proportion, from beta quantiles; with
  clustered trials, `effective_trials` shrinks n by the design effect (Korn & Graubard 1998) first.
- `bca_interval(estimate, resampled, jackknife)`: the bias-corrected and accelerated bootstrap interval, the
  same formula as scipy.stats.bootstrap(method="BCa") (checked in the tests). All resamples equal: degenerate,
  reported as None and listed as such, never as a zero-width interval.
- `resample_weights(groups, resamples, seed)`: a (B, N) matrix of how often each image is drawn when whole
  groups (scans) are drawn with replacement; one image per group is the ordinary bootstrap.
- `jackknife_weights(groups)`: leave-one-group-out weights, for BCa's acceleration.
- `sign_flip_test(differences, groups)`: a paired permutation test that flips the sign of whole groups.
- `holm(p_values)`: Holm's step-down adjustment (statsmodels' multipletests(method="holm")).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import special, stats


def clopper_pearson(k: float, n: float, level: float = 0.95) -> Optional[list[float]]:
    """[low, high] exact binomial interval of k successes in n trials (k, n may be non-integer effective
    counts); None without a trial. 35 of 35 gives [0.900, 1]."""
    if n <= 0:
        return None
    alpha = 1 - level
    low = 0.0 if k <= 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k >= n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return [low, high]


def design_effect(success: np.ndarray, groups: np.ndarray) -> float:
    """Variance of the clustered proportion (ratio estimator, between-group) over the binomial variance;
    at least 1 (Korn & Graubard's truncation), 1 for a proportion of 0 or 1 or a single group."""
    success = np.asarray(success, dtype=np.float64)
    n = len(success)
    _, group = np.unique(groups, return_inverse=True)
    g = group.max() + 1 if n else 0
    p = success.mean() if n else 0.0
    if n == 0 or g < 2 or p in (0.0, 1.0):
        return 1.0
    per_group = np.bincount(group, weights=success - p, minlength=g)
    clustered = g / (g - 1) * float((per_group ** 2).sum()) / n ** 2
    return max(1.0, clustered / (p * (1 - p) / n))


def proportion_interval(success: np.ndarray, groups: Optional[np.ndarray] = None,
                        level: float = 0.95) -> tuple[Optional[list[float]], str]:
    """(Clopper–Pearson interval of the share of True in `success`, its method name); with `groups`, on the
    effective number of trials n / design effect."""
    success = np.asarray(success, dtype=bool)
    n, k = len(success), int(success.sum())
    if groups is None or len(np.unique(groups)) == n:
        return clopper_pearson(k, n, level), "clopper-pearson"
    effective = n / design_effect(success, np.asarray(groups))
    return clopper_pearson(k / n * effective, effective, level), "clopper-pearson, effective n (scan groups)"


def bca_interval(estimate: float, resampled: np.ndarray, jackknife: np.ndarray,
                 level: float = 0.95) -> Optional[list[float]]:
    """BCa interval from the estimate, its bootstrap resamples and its jackknife (leave-one-out) values; NaN
    resamples are left out. None when degenerate (every resample equal) or undefined."""
    resampled = np.asarray(resampled, dtype=np.float64)
    resampled = resampled[np.isfinite(resampled)]
    jackknife = np.asarray(jackknife, dtype=np.float64)
    jackknife = jackknife[np.isfinite(jackknife)]
    if len(resampled) < 2 or not np.isfinite(estimate) or is_degenerate(resampled):
        return None
    # bias correction: scipy's percentile-of-score (ties count half)
    share = ((resampled < estimate).sum() + (resampled <= estimate).sum()) / (2 * len(resampled))
    z0 = special.ndtri(share)
    spread = jackknife.mean() - jackknife
    denominator = 6 * float((spread ** 2).sum()) ** 1.5
    acceleration = float((spread ** 3).sum()) / denominator if denominator > 0 else 0.0
    bounds = []
    for z in (special.ndtri((1 - level) / 2), special.ndtri((1 + level) / 2)):
        alpha = special.ndtr(z0 + (z0 + z) / (1 - acceleration * (z0 + z)))
        if not np.isfinite(alpha):
            return None
        bounds.append(float(np.percentile(resampled, 100 * alpha)))
    return bounds


def is_degenerate(resampled: np.ndarray) -> bool:
    """Every finite resample equal up to rounding (e.g. Dice 1.0 on every image): no interval can be read off."""
    values = np.asarray(resampled, dtype=np.float64)
    values = values[np.isfinite(values)]
    return len(values) > 0 and np.ptp(values) <= 1e-12 * max(1.0, float(np.abs(values).max()))


def dense_groups(groups: Optional[Sequence], n: int) -> np.ndarray:
    """Group ids as 0..G-1 for n images; None: every image its own group."""
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group ids for {n} images")
    return np.unique(groups, return_inverse=True)[1].reshape(-1)


def resample_weights(groups: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, N) float matrix: how often each image is drawn when the G groups are drawn G times with
    replacement (each image of a drawn group comes along); one image per group: the per-image bootstrap."""
    groups = dense_groups(groups, len(groups))
    n = len(groups)
    if n < 1 or resamples < 1:
        raise ValueError(f"need at least one image and one resample, got {n} images and {resamples} resamples")
    g = int(groups.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, g, size=(resamples, g))
    flat = (np.arange(resamples)[:, None] * g + draws).ravel()
    per_group = np.bincount(flat, minlength=resamples * g).reshape(resamples, g).astype(np.float64)
    return per_group[:, groups]


def jackknife_weights(groups: np.ndarray, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
    """(G, N) weights: row g leaves out every image of group g (rows `start`..`stop` only: memory grows with
    G x N, so callers with many images take the rows in chunks)."""
    groups = dense_groups(groups, len(groups))
    g = int(groups.max()) + 1 if len(groups) else 0
    rows = np.arange(start, g if stop is None else min(stop, g))
    return 1.0 - (groups[None, :] == rows[:, None]).astype(np.float64)


def sign_flip_test(differences: np.ndarray, groups: Optional[np.ndarray] = None, resamples: int = 10000,
                   seed: int = 0) -> float:
    """Two-sided p-value of mean(differences) = 0 by flipping the sign of whole groups (scans) at random:
    exchangeable under H0 when the two models are equally good, whatever the dependence inside a group.
    Exact (all 2^G flips) for G <= 12; the Monte Carlo p counts the observed flip (never 0)."""
    differences = np.asarray(differences, dtype=np.float64)
    if len(differences) == 0:
        return float("nan")
    group = dense_groups(groups, len(differences))
    sums = np.bincount(group, weights=differences)
    observed = abs(sums.sum())
    if observed == 0:
        return 1.0
    g = len(sums)
    if g <= 12:
        signs = 1 - 2 * ((np.arange(2 ** g)[:, None] >> np.arange(g)) & 1)
        return float((np.abs(signs @ sums) >= observed - 1e-12).mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(resamples, g))
    return float(((np.abs(signs @ sums) >= observed - 1e-12).sum() + 1) / (resamples + 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given (NaN stays NaN and is not counted)."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(len(p), np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for rank, position in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[position]))
        adjusted[position] = running
    return [float(v) for v in adjusted]
