"""Classification calibration: expected calibration error, reliability bins, temperature scaling.

ECE (Guo et al., 2017): the predicted class's probability (confidence) is binned into 15 equal-width bins on
(0, 1]; ECE = sum over bins of (images in bin / N) x |accuracy in bin - mean confidence in bin|. Temperature
scaling divides the logits by one scalar T > 0 fitted on the validation split by minimising the negative
log-likelihood; it never changes the predicted class, so accuracy and F1 are unchanged.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

ECE_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / temperature)."""
    log_p = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-log_p[np.arange(len(labels)), labels].mean())


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin (lo, hi]: image count, mean confidence and accuracy (None for an empty bin)."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin b holds confidences in (edges[b], edges[b + 1]]; a confidence of exactly 0 cannot occur (max of K >= 2).
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        member = which == b
        count = int(member.sum())
        out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                    "confidence": float(confidence[member].mean()) if count else None,
                    "accuracy": float(correct[member].mean()) if count else None})
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    total = len(labels)
    if total == 0:
        return 0.0
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(probs, labels, bins) if b["count"]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(logits / T), searched over log T in [-4, 4]."""
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on zero images")
    result = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=(-4.0, 4.0),
                             method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def calibration_summary(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict:
    """ECE (15 bins), NLL and the reliability bins at `temperature`, and the uncalibrated ECE / NLL beside them."""
    probs = softmax(logits, temperature)
    raw = softmax(logits)
    return {"temperature": temperature, "ece": expected_calibration_error(probs, labels), "nll": nll(
        logits, labels, temperature), "ece_uncalibrated": expected_calibration_error(raw, labels),
        "nll_uncalibrated": nll(logits, labels), "bins": reliability_bins(probs, labels)}
