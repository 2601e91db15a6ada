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
    """Histogram equalisation of a [0, 1] image: each value becomes its rank (the image's own CDF)."""
    hist, edges = np.histogram(x, bins=bins, range=(0.0, 1.0))
    cdf = np.cumsum(hist).astype(np.float64)
    if cdf[-1] == 0 or hist.max() == cdf[-1]:  # empty or one flat value: nothing to spread
        return x
    cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    return np.interp(x, edges[1:], cdf).astype(np.float32)
