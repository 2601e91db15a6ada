"""Out-of-distribution gate: is this a usable frontal chest X-ray?

Two layers. Cheap image checks first (blank or structureless, colour
photograph, round field of view). Then a k-nearest-neighbour distance to real
training X-rays, in two spaces: the model's own embedding (cosine), and a tiny
normalised thumbnail of the image (16x16: the layout of lungs, mediastinum and
diaphragm). Each distance is scaled by its 99th percentile on held-out X-rays
and the sum is compared with a threshold set on held-out X-rays. Fitting and
scoring are numpy-only, so training and serving share this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import Refusal
from .pixels import resize_gray

BLANK_STD = 0.02  # gray std below this: blank or uniform
COLOR_LIMIT = 0.08  # mean chroma above this: a colour photograph
MIN_STRUCTURE = 0.004  # mean |Laplacian| of the stretched 64 px thumbnail below this: no structure
THUMB = 16


def check_image(gray: np.ndarray, colorfulness: float) -> None:
    """Refuse images that cannot be X-rays whatever the model thinks."""
    if float(gray.std()) < BLANK_STD:
        raise Refusal("blank_image")
    if colorfulness > COLOR_LIMIT:
        raise Refusal("color_photo")
    small = _contrast_thumb(gray)
    if structure(small) < MIN_STRUCTURE:
        raise Refusal("blank_image", "The image has no structure (a smooth ramp or fill), not an X-ray.")
    if circular_field(small):
        raise Refusal("not_chest_xray", "The image has a round field of view (a fundus, endoscope or microscope "
                                        "photograph), not a chest X-ray.")


def _contrast_thumb(gray: np.ndarray, n: int = 64) -> np.ndarray:
    """n x n thumbnail stretched so that its 1st..99th percentiles span 0..1."""
    g = resize_gray(gray, (n, n)).astype(np.float32)
    lo, hi = np.percentile(g, [1, 99])
    return (g - lo) / max(float(hi - lo), 1e-6)


def structure(small: np.ndarray) -> float:
    """Mean absolute Laplacian of a ``_contrast_thumb``: zero for a fill or a linear ramp.

    Real X-rays (ribs, vessels, edges) score at least 0.0158 on 4,936 images of
    every source; the limit sits four times below that.
    """
    lap = 4 * small[1:-1, 1:-1] - small[:-2, 1:-1] - small[2:, 1:-1] - small[1:-1, :-2] - small[1:-1, 2:]
    return float(np.abs(lap).mean())


def circular_field(small: np.ndarray) -> bool:
    """Black outside the inscribed circle of a ``_contrast_thumb``, not black along its inner rim.

    Fundus, endoscope and microscope photographs have a round field of view;
    grayscale ones pass the colour check and sit close enough to X-rays in the
    kNN gate. Chest X-rays have shoulders, neck or abdomen in the corners: none
    of 3,702 training-set and 1,970 test-set X-rays matches.
    """
    outside, rim = _circle_masks(small.shape[0])
    return float((small[outside] < 0.05).mean()) > 0.9 and float((small[rim] < 0.05).mean()) < 0.1


@lru_cache(maxsize=4)
def _circle_masks(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(outside the inscribed circle, its inner rim) for an n x n image; built once, not per upload."""
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2) / (n / 2)
    return r > 1.02, (r > 0.80) & (r < 0.95)


def thumbnail(gray: np.ndarray, size: int = THUMB) -> np.ndarray:
    """Zero-mean, unit-norm size x size thumbnail (float32)."""
    t = resize_gray(gray, (size, size)).ravel().astype(np.float32)
    t -= t.mean()
    return t / (np.linalg.norm(t) + 1e-6)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, np.float32))
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


@dataclass
class XrayGate:
    emb_ref: np.ndarray  # (N, D) unit-norm training embeddings
    thumb_ref: np.ndarray  # (N, T) unit-norm training thumbnails
    k: int
    emb_scale: float
    thumb_scale: float
    threshold: float

    def _knn(self, ref: np.ndarray, x: np.ndarray) -> np.ndarray:
        sims = x @ ref.T
        k = min(self.k, ref.shape[0])
        return 1.0 - np.partition(sims, -k, axis=1)[:, -k]

    def score(self, emb: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
        """About 1-2 for real X-rays; larger is further from them."""
        e = self._knn(self.emb_ref, _unit(emb))  # refs are float32 after fit_gate and load
        t = self._knn(self.thumb_ref, _unit(thumbs))
        return e / self.emb_scale + t / self.thumb_scale

    def save(self, path: Path) -> None:
        np.savez_compressed(path, emb_ref=self.emb_ref.astype(np.float16), thumb_ref=self.thumb_ref.astype(np.float16),
                            k=self.k, emb_scale=self.emb_scale, thumb_scale=self.thumb_scale, threshold=self.threshold)

    @classmethod
    def load(cls, path: Path) -> "XrayGate":
        z = np.load(path)
        return cls(z["emb_ref"].astype(np.float32), z["thumb_ref"].astype(np.float32), int(z["k"]),
                   float(z["emb_scale"]), float(z["thumb_scale"]), float(z["threshold"]))


MIN_GROUP = 20  # held-out X-rays a source needs before its own quantile may raise the threshold
# a source's own quantile: lower than the pooled one, because a collection's few odd films (radiography/ holds
# some) would otherwise lift the threshold over faces, text and other modalities
GROUP_QUANTILE = 0.99


def fit_gate(fit_emb, fit_thumbs, held_emb, held_thumbs, k: int = 3, quantile: float = 0.995,
             held_groups: list[str] | None = None) -> XrayGate:
    """Reference sets from training X-rays; scales and threshold from held-out X-rays.

    With ``held_groups`` (the source of each held-out X-ray) the threshold is the highest of the overall
    ``quantile`` and each source's own ``GROUP_QUANTILE``: a source unlike the others (128 px films of one TB
    programme) would otherwise have its films refused far more often than the overall rate says."""
    gate = XrayGate(_unit(fit_emb), _unit(fit_thumbs), k, 1.0, 1.0, np.inf)
    e = gate._knn(gate.emb_ref, _unit(held_emb))
    t = gate._knn(gate.thumb_ref, _unit(held_thumbs))
    gate.emb_scale = float(np.quantile(e, 0.99)) or 1.0
    gate.thumb_scale = float(np.quantile(t, 0.99)) or 1.0
    score = e / gate.emb_scale + t / gate.thumb_scale
    gate.threshold = float(np.quantile(score, quantile))
    if held_groups is not None:
        groups = np.asarray(held_groups)
        for g in np.unique(groups):
            if (groups == g).sum() >= MIN_GROUP:
                gate.threshold = max(gate.threshold, float(np.quantile(score[groups == g], GROUP_QUANTILE)))
    return gate


def fit_gate_from_onnx(model_path: Path, spec, fit_paths: list[str], held_paths: list[str], batch: int = 32,
                       held_groups: list[str] | None = None) -> XrayGate:
    """Fit the gate with an exported model (the same outputs the server sees)."""
    import onnxruntime as ort

    from .imaging import decode
    from .preprocessing import preprocess

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    idx = names.index("embedding")

    def run(paths):
        embs, thumbs = [], []
        for i in range(0, len(paths), batch):
            grays = [decode(p).gray for p in paths[i:i + batch]]
            x = np.stack([preprocess(g, spec) for g in grays])
            embs.append(sess.run(None, {sess.get_inputs()[0].name: x})[idx])
            thumbs += [thumbnail(g) for g in grays]
        return np.concatenate(embs), np.stack(thumbs)

    fe, ft = run(fit_paths)
    he, ht = run(held_paths)
    return fit_gate(fe, ft, he, ht, held_groups=held_groups)
