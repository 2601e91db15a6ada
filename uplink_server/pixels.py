"""Operations on a gray [0, 1] image that every stage shares: resizing, histogram equalisation, CLAHE.

They live below both ``preprocessing`` (the model's input) and ``lungfield`` (the segmenter's input), which
otherwise would import each other."""

from __future__ import annotations

import numpy as np
from PIL import Image

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST, "area": Image.BOX}


def resize_gray(gray: np.ndarray, size: tuple[int, int], resample: str = "bilinear") -> np.ndarray:
    h, w = size
    if gray.shape == (h, w):
        return gray.astype(np.float32, copy=False)
    img = Image.fromarray(gray.astype(np.float32), mode="F")
    # Downscaling by a lot with bilinear aliases; reduce() first like a box filter would.
    factor = min(gray.shape[0] // h, gray.shape[1] // w)
    if factor >= 2:
        img = img.reduce(factor)
    return np.asarray(img.resize((w, h), _RESAMPLE[resample]), dtype=np.float32)


def clahe(x: np.ndarray) -> np.ndarray:
    """Histogram equalisation, then contrast-limited adaptive histogram equalisation (scikit-image's) of a
    [0, 1] image. CLAHE alone at the usual clip limit keeps most of a machine's exposure curve (its clipping is
    what limits noise); equalising first removes the curve, CLAHE then brings out local contrast."""
    try:
        from skimage.exposure import equalize_adapthist
    except ImportError:
        raise RuntimeError("intensity='clahe' needs scikit-image: pip install scikit-image") from None
    return equalize_adapthist(equalize(x).astype(np.float64), clip_limit=0.01).astype(np.float32)


def equalize(x: np.ndarray, bins: int = 256) -> np.ndarray:
    """Histogram equalisation of a [0, 1] image: each value becomes its rank (the image's own CDF).

    What ``np.histogram(x, bins, range=(0, 1))`` and ``np.interp(x, edges[1:], cdf)`` give, written for equal bins
    (a bin index is ``floor(x * bins)``, the interpolation is within that bin): 2.5x faster on a 224 px input, where
    the general functions' searches cost more than the rest of preprocessing (BENCHMARKS.md, issue 25)."""
    inside = (x >= 0) & (x <= 1)  # np.histogram leaves values outside its range uncounted
    counted = x if inside.all() else x[inside]
    hist = np.bincount(np.minimum((counted * bins).astype(np.intp), bins - 1).ravel(), minlength=bins)
    cdf = np.cumsum(hist).astype(np.float64)
    if cdf[-1] == 0 or hist.max() == cdf[-1]:  # empty or one flat value: nothing to spread
        return x
    cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    # the CDF is known at each bin's upper edge (k + 1) / bins; below the first edge it is cdf[0], above 1 cdf[-1]
    t = x.astype(np.float64) * bins - 1
    k = np.clip(np.floor(t), 0, bins - 2).astype(np.intp)
    frac = np.clip(t - k, 0, 1)
    return (cdf[k] + frac * (cdf[k + 1] - cdf[k])).astype(np.float32)
