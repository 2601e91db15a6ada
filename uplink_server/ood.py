"""Out-of-distribution gate: is this a usable frontal chest X-ray?

Two layers. Cheap image checks first (blank, colour photograph). Then a
probabilistic-PCA Mahalanobis distance of the model's embedding from the
training X-rays, with a threshold calibrated on held-out real X-rays. Fitting
and scoring are numpy-only, so training and serving share this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import Refusal

BLANK_STD = 0.02  # gray std below this: blank or uniform
COLOR_LIMIT = 0.08  # mean chroma above this: a colour photograph


def check_image(gray: np.ndarray, colorfulness: float) -> None:
    """Refuse images that cannot be X-rays whatever the model thinks."""
    if float(gray.std()) < BLANK_STD:
        raise Refusal("blank_image")
    if colorfulness > COLOR_LIMIT:
        raise Refusal("color_photo")


@dataclass
class EmbeddingGate:
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D) principal axes
    variances: np.ndarray  # (k,)
    residual_variance: float  # per discarded dimension
    threshold: float

    def score(self, emb: np.ndarray) -> np.ndarray:
        """Squared PPCA Mahalanobis distance, divided by D (≈1 for typical X-rays)."""
        emb = np.atleast_2d(emb).astype(np.float64)
        c = emb - self.mean
        z = c @ self.components.T
        resid = (c * c).sum(axis=1) - (z * z).sum(axis=1)
        d = (z * z / self.variances).sum(axis=1) + np.maximum(resid, 0) / self.residual_variance
        return d / emb.shape[1]

    def is_outlier(self, emb: np.ndarray) -> np.ndarray:
        return self.score(emb) > self.threshold

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path, mean=self.mean.astype(np.float32), components=self.components.astype(np.float32),
            variances=self.variances.astype(np.float32), residual_variance=np.float64(self.residual_variance),
            threshold=np.float64(self.threshold),
        )

    @classmethod
    def load(cls, path: Path) -> "EmbeddingGate":
        z = np.load(path)
        return cls(
            z["mean"].astype(np.float64), z["components"].astype(np.float64), z["variances"].astype(np.float64),
            float(z["residual_variance"]), float(z["threshold"]),
        )


def fit_gate(fit_emb: np.ndarray, calib_emb: np.ndarray, k: int = 64, quantile: float = 0.995, margin: float = 1.25) -> EmbeddingGate:
    """Fit on training embeddings; set the threshold on held-out X-rays.

    The threshold is the ``quantile`` of held-out scores times ``margin``, so
    that well under 1 % of real X-rays are refused.
    """
    x = np.asarray(fit_emb, dtype=np.float64)
    mean = x.mean(axis=0)
    c = x - mean
    k = int(min(k, c.shape[0] - 1, c.shape[1]))
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    var = s**2 / max(1, c.shape[0] - 1)
    total = var.sum() if len(var) else 1.0
    comps, variances = vt[:k], np.maximum(var[:k], 1e-8 * total)
    resid_dims = c.shape[1] - k
    resid_var = max(float(var[k:].sum()) / max(resid_dims, 1), 1e-8 * total / c.shape[1])
    gate = EmbeddingGate(mean, comps, variances, resid_var, threshold=np.inf)
    held = gate.score(calib_emb)
    gate.threshold = float(np.quantile(held, quantile) * margin)
    return gate
