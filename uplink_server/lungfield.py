"""The lung field of a chest X-ray, found by a small segmenter (ONNX), and the box a model reads.

A classifier that sees only the box around the lungs cannot read the text, markers, collimation and
shoulders that tell one hospital from another (issue 16). The segmenter is trained by
``python -m model_training segmenter`` on the public lung masks; serving needs only ONNX Runtime.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

SEGMENTER_NAME = "lung-segmenter.onnx"
SIZE = 128  # the segmenter's input side: lung outlines need no more
MIN_LUNG_SHARE = 0.05  # below this the segmenter found no lungs: the model reads the whole frame
MARGIN = 0.06  # share of each side added around the lungs (costophrenic angles, apices)
MIN_SIDE = 0.3  # a box narrower than this share of the image is not trusted

_sessions: dict[str, object] = {}
_lock = threading.Lock()


class SegmenterMissing(FileNotFoundError):
    pass


def default_segmenter_path() -> Path:
    """$CXR_LUNG_SEGMENTER, else the shipped one in weights/."""
    env = os.environ.get("CXR_LUNG_SEGMENTER")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "weights" / SEGMENTER_NAME


def segmenter_input(gray: np.ndarray) -> np.ndarray:
    """(1, SIZE, SIZE) float32: the one preprocessing of the segmenter, in training and serving. Equalised, so
    every machine's exposure curve looks alike."""
    from .pixels import equalize, resize_gray

    x = equalize(np.clip(resize_gray(gray, (SIZE, SIZE)), 0.0, 1.0))
    return ((x - 0.5) / 0.25).astype(np.float32)[None]


def _session(path: Path):
    key = f"{path}|{os.getpid()}"  # a session does not cross a fork (training's loader processes): one per process
    with _lock:
        if key not in _sessions:
            if not path.is_file():
                raise SegmenterMissing(f"lung segmenter not found at {path}: train it with "
                                       "`python -m model_training segmenter` or set CXR_LUNG_SEGMENTER")
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1  # tiny network: threads cost more than they give
            _sessions[key] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return _sessions[key]


def check_segmenter(path: Path | None = None) -> None:
    """Load the segmenter now (raises SegmenterMissing): a server checks at start, not at the first upload."""
    _session(Path(path) if path else default_segmenter_path())


def lung_probability(grays: list[np.ndarray], path: Path | None = None) -> np.ndarray:
    """(N, SIZE, SIZE) probability that each pixel is lung."""
    sess = _session(Path(path) if path else default_segmenter_path())
    x = np.stack([segmenter_input(g) for g in grays])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0][:, 0]
    return 1.0 / (1.0 + np.exp(-logits))


def box_from_mask(mask: np.ndarray, shape: tuple[int, int], margin: float = MARGIN) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) in an image of ``shape`` around a boolean lung mask (any size); the whole
    frame when the mask holds too little lung to trust."""
    h, w = shape
    if mask.mean() < MIN_LUNG_SHARE:
        return 0, h, 0, w
    ys, xs = np.nonzero(mask)
    mh, mw = mask.shape
    # quantiles, not min/max: a few stray pixels must not stretch the box
    t, b = np.quantile(ys, [0.002, 0.998]) / mh
    l, r = np.quantile(xs, [0.002, 0.998]) / mw
    t, b, l, r = max(0.0, t - margin), min(1.0, (b + 1 / mh) + margin), max(0.0, l - margin), min(1.0, (r + 1 / mw) + margin)
    if b - t < MIN_SIDE or r - l < MIN_SIDE:
        return 0, h, 0, w
    return int(round(t * h)), int(round(b * h)), int(round(l * w)), int(round(r * w))


def lung_box(gray: np.ndarray, path: Path | None = None) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the lung field of a gray [0, 1] image, with a margin."""
    return box_from_mask(lung_probability([gray], path)[0] > 0.5, gray.shape)


def lung_field(gray: np.ndarray, path: Path | None = None, grow: int = 9) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """The lung box and a soft mask at ``gray``'s size: the lungs grown by about ``grow`` / SIZE of the image
    (edges and the costophrenic angles stay in), 1 inside, fading to 0 outside. Where no lungs are found the
    mask is all ones: the model reads the whole frame."""
    from PIL import Image, ImageFilter

    mask = lung_probability([gray], path)[0] > 0.5
    box = box_from_mask(mask, gray.shape)
    if box == (0, gray.shape[0], 0, gray.shape[1]) and mask.mean() < MIN_LUNG_SHARE:
        return box, np.ones(gray.shape, np.float32)
    grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(grow)).filter(ImageFilter.BoxBlur(2))
    soft = np.asarray(grown.resize(gray.shape[::-1], Image.BILINEAR), np.float32) / 255.0
    return box, soft
