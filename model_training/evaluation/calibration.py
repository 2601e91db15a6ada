"""Temperature scaling and expected calibration error.

numpy only: the web app refits the temperature on a clinic's reviewed cases (local recalibration) without the
training stack.
"""

from __future__ import annotations

import math

import numpy as np


def log_softmax(z: np.ndarray, axis: int = 1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def softmax(z: np.ndarray, axis: int = 1) -> np.ndarray:
    return np.exp(log_softmax(z, axis))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising validation NLL of softmax(logits / T)."""
    if len(y) == 0:
        return 1.0
    # golden-section search on log T in [0.05, 20]: the NLL is unimodal in T
    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits, y, math.exp(a)), nll(logits, y, math.exp(b))
    for _ in range(60):  # interval shrinks to ~1e-12 of its width
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logits, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits, y, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-class confidence, equal-width bins."""
    if len(y) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    bins = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(bins[:-1], bins[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def calibrated_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(logits / temperature, axis=1)


def calibrate(val_logits: np.ndarray, val_y: np.ndarray, test: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Temperature scaling fitted on validation, with ECE before and after (and on ``test`` = (logits, y))."""
    t = fit_temperature(val_logits, val_y)
    out = {
        "method": "temperature scaling on the validation split",
        "temperature": t,
        "ece_val_before": expected_calibration_error(calibrated_probs(val_logits, 1.0), val_y),
        "ece_val_after": expected_calibration_error(calibrated_probs(val_logits, t), val_y),
    }
    if test is not None:
        tl, ty = test
        out["ece_test_before"] = expected_calibration_error(calibrated_probs(tl, 1.0), ty)
        out["ece_test_after"] = expected_calibration_error(calibrated_probs(tl, t), ty)
    return out
