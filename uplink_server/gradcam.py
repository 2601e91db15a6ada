"""Class activation heatmaps from the ONNX model's ``cam`` output (no torch).

The models end in global average pooling + one linear layer, where Grad-CAM
reduces to CAM: the weighted sum of the last feature maps. The graph computes
it; here we pick the class, rectify, normalise, upsample and colour it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def normalize_cam(cam: np.ndarray) -> np.ndarray:
    """(h, w) class map -> [0, 1]: positive evidence only, stretched to its range."""
    cam = np.maximum(cam.astype(np.float32), 0)
    lo, hi = float(cam.min()), float(cam.max())
    return (cam - lo) / (hi - lo) if hi > lo else np.zeros_like(cam)


def upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a [0, 1] map to (width, height)."""
    img = Image.fromarray(cam.astype(np.float32), mode="F").resize(size, Image.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0, 1)


def _jet(v: np.ndarray) -> np.ndarray:
    """A jet-like colour map without matplotlib (serving stays light)."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], axis=-1)


def in_frame(cam: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int] | None = None,
             shape: tuple[int, int] | None = None) -> np.ndarray:
    """The [0, 1] map upsampled to the whole image (width, height); a model that read only part of it
    (``box`` = top, bottom, left, right in an image of ``shape``, default ``size``'s) gets its map drawn
    into that box, zero outside."""
    w, h = size
    sh, sw = shape or (h, w)
    if box is None or tuple(box) == (0, sh, 0, sw):
        return upsample(cam, size)
    top, bottom = round(box[0] * h / sh), round(box[1] * h / sh)
    left, right = round(box[2] * w / sw), round(box[3] * w / sw)
    heat = np.zeros((h, w), np.float32)
    if bottom > top and right > left:
        heat[top:bottom, left:right] = upsample(cam, (right - left, bottom - top))
    return heat


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.45, max_side: int = 768,
            box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Blend the heatmap over the X-ray (RGB image, at most ``max_side`` px)."""
    h, w = gray.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = np.asarray(Image.fromarray((np.clip(gray, 0, 1) * 255).astype(np.uint8)).resize(size, Image.BILINEAR), np.float32) / 255
    heat = in_frame(cam, size, box, gray.shape)
    rgb = np.repeat(base[..., None], 3, axis=2)
    a = (alpha * heat)[..., None]  # weak evidence stays transparent
    out = (1 - a) * rgb + a * _jet(heat)
    return Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8), mode="RGB")


def to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # speed over a few kB
    return buf.getvalue()


# what a web app asks a model server for (``heatmap`` of a job) when it draws the picture itself on first view
MAP_ONLY = "map"


def requested(value) -> bool | str:
    """The ``heatmap`` argument for a job's ``heatmap`` field: the class map when asked for it, else the picture
    (jobs from web apps that predate the field)."""
    return MAP_ONLY if value == MAP_ONLY else True


def map_to_dict(cam: np.ndarray, box, shape) -> dict:
    """A class map as plain JSON values (a few hundred bytes): the map, the box the model read, the image's shape.
    The form a kept map has on disk and on the wire from a model server (``heatmap: "map"`` jobs)."""
    return {"cam": np.asarray(cam, np.float64).tolist(), "box": [int(v) for v in box] if box is not None else None,
            "shape": [int(v) for v in shape]}


def map_from_dict(kept: dict) -> tuple[np.ndarray, tuple | None, tuple]:
    """(cam, box, shape) from ``map_to_dict``'s form; ValueError when it is not one."""
    try:
        cam = np.asarray(kept["cam"], np.float32)
        box = tuple(int(v) for v in kept["box"]) if kept.get("box") is not None else None
        shape = tuple(int(v) for v in kept["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a class map: {exc!r}") from None
    if cam.ndim != 2 or len(shape) != 2 or (box is not None and len(box) != 4):
        raise ValueError(f"not a class map: cam {cam.shape}, shape {shape}, box {box}")
    return cam, box, shape


def save_map(path, cam: np.ndarray, box, shape) -> None:
    """A class map kept to draw later (JSON: cheaper to write than any archive)."""
    import json

    with open(path, "w") as fh:
        json.dump(map_to_dict(cam, box, shape), fh)


def render(map_path, gray: np.ndarray) -> bytes:
    """The heatmap PNG of a kept class map over the image it was computed on."""
    import json

    with open(map_path) as fh:
        cam, box, shape = map_from_dict(json.load(fh))
    if tuple(gray.shape) != shape:  # the stored image was turned since: no map of the old orientation on it
        raise ValueError(f"the image is {gray.shape}, the map was made on {list(shape)}")
    return to_png(overlay(gray, cam, box=box))
