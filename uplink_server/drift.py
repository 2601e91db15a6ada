"""Drift: how a site's scores and images differ from the model card's validation data.

The card keeps histograms of the validation split (``python -m model_training reference``); a site compares its
own with the population stability index (PSI), the usual shift measure of deployed scorecards: below 0.1 no
real change, 0.1-0.25 some, above 0.25 a large shift worth a look before trusting the numbers.
"""

from __future__ import annotations

import numpy as np

# What is compared, and its bins. risk: probability of anything but normal; mean/std: of the gray image in [0, 1].
BINS = {"risk": np.linspace(0.0, 1.0, 11), "image_mean": np.linspace(0.0, 1.0, 11), "image_std": np.linspace(0.0, 0.5, 11)}
LARGE = 0.25


def image_statistics(gray: np.ndarray) -> dict:
    """The image's own exposure: mean and spread of its gray levels (a machine or protocol change moves them)."""
    return {"image_mean": round(float(gray.mean()), 4), "image_std": round(float(gray.std()), 4)}


def histogram(values, key: str) -> list[float]:
    """Shares of ``values`` in the bins of ``key`` (values outside fall into the end bins)."""
    edges = BINS[key]
    v = np.clip(np.asarray(values, float), edges[0], edges[-1])
    counts = np.histogram(v, bins=edges)[0]
    return (counts / max(1, counts.sum())).round(5).tolist()


def psi(site: list[float], ref: list[float], eps: float = 1e-3) -> float:
    s = np.clip(np.asarray(site, float), eps, None)
    r = np.clip(np.asarray(ref, float), eps, None)
    return float(np.sum((s - r) * np.log(s / r)))


def reference(values: dict[str, list[float]]) -> dict:
    """What a card keeps: the bins and the validation split's share in each."""
    return {"n": len(next(iter(values.values()))), "bins": {k: BINS[k].round(4).tolist() for k in values},
            "hist": {k: histogram(v, k) for k, v in values.items()}}


def compare(ref: dict | None, values: dict[str, list[float]], min_n: int = 30) -> dict:
    """PSI per statistic against the card's reference; ``large`` names the shifted ones, ``too_few`` those above
    the threshold on fewer than ``min_n`` images (a PSI on a handful of images is noise, and the page says so)."""
    if not ref:
        return {"available": False}
    out = {"available": True, "stats": {}, "large": [], "too_few": [], "threshold": LARGE, "min_n": min_n}
    for k, v in values.items():
        if k not in ref.get("hist", {}) or not v:
            continue
        site = histogram(v, k)
        value = psi(site, ref["hist"][k])
        out["stats"][k] = {"n": len(v), "psi": round(value, 4), "site": site, "reference": ref["hist"][k]}
        if value > LARGE:
            out["large" if len(v) >= min_n else "too_few"].append(k)
    return out
