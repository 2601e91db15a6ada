"""Training-time augmentation of the resized gray image (numpy + PIL, no torch).

``study`` mirrors the paper's Keras ImageDataGenerator settings (rotation,
width/height shift, shear, zoom, horizontal flip); ``default`` is milder and
keeps left/right anatomy (the heart is on the left), plus brightness/contrast;
``robust`` adds gamma and blur/sharpening, the ways X-ray machines differ;
``framing`` adds strong zoom-in, the way collimation differs between sites and
patient sizes (a model trained without it calls tightly framed normals pneumonia);
``resolution`` adds down-and-up sampling of every film to a random effective resolution, so that
a source stored at low resolution (the Shenzhen TB films are 128 px) is not told apart by its blur.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class AugmentConfig:
    rotation: float = 0.0  # degrees, +-
    shift: float = 0.0  # fraction of width/height, +-
    shear: float = 0.0  # degrees, +-
    zoom: float = 0.0  # +- fraction
    zoom_in: float = 0.0  # zoom drawn from [1 - zoom, 1 + max(zoom, zoom_in)]: tighter framing
    hflip: bool = False
    brightness: float = 0.0  # +- additive
    contrast: float = 0.0  # +- multiplicative
    gamma: float = 0.0  # +- log-gamma: x ** exp(U(-g, g)) on [0, 1], another machine's tone curve
    blur: float = 0.0  # gaussian sigma up to this (pixels), or as much unsharp masking: softer/sharper detectors
    # smallest effective resolution as a share of the input size: with probability LOWRES_P a film is reduced
    # (area filter) to a side drawn from [lowres, 1] x size and enlarged back (bilinear), as a third-party
    # resize to 128 px and the server's enlargement to 224 px do to the TB films
    lowres: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "none": AugmentConfig(),
    "study": AugmentConfig(rotation=20, shift=0.2, shear=11.5, zoom=0.2, hflip=True),
    "default": AugmentConfig(rotation=10, shift=0.08, shear=5, zoom=0.12, brightness=0.08, contrast=0.15),
    # default plus the photometric differences between X-ray machines and their processing
    "robust": AugmentConfig(rotation=10, shift=0.08, shear=5, zoom=0.12, brightness=0.08, contrast=0.15,
                            gamma=0.3, blur=1.0),
    # robust plus framing from slightly wider to 1.5x tighter: Kermany's test normals are collimated
    # tighter than its training normals, and tight framing alone was read as pneumonia
    "framing": AugmentConfig(rotation=10, shift=0.08, shear=5, zoom=0.12, zoom_in=0.5, brightness=0.08,
                             contrast=0.15, gamma=0.3, blur=1.0),
    # framing plus effective resolutions from 0.35 x 224 = 78 px up: every source as blurred as the 128 px TB
    # films a third of the time, so that blur cannot stand for tuberculosis (model 2.0.0)
    "resolution": AugmentConfig(rotation=10, shift=0.08, shear=5, zoom=0.12, zoom_in=0.5, brightness=0.08,
                                contrast=0.15, gamma=0.3, blur=1.0, lowres=0.35),
}

LOWRES_P = 0.75


def degrade_resolution(x: np.ndarray, scale: float) -> np.ndarray:
    """``x`` reduced to ``scale`` of its size with an area filter and enlarged back: the detail a film
    stored at that resolution still has."""
    h, w = x.shape
    small = (max(2, round(w * scale)), max(2, round(h * scale)))
    if small[0] >= w and small[1] >= h:
        return x
    img = Image.fromarray(x.astype(np.float32), mode="F").resize(small, Image.BOX)
    return np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32)


def parse_augment(spec: str) -> AugmentConfig:
    """A preset name, or key=value pairs: ``rotation=15,shift=0.1,hflip=1``."""
    if spec in PRESETS:
        return PRESETS[spec]
    kwargs = {}
    for item in spec.split(","):
        if "=" not in item:
            raise ValueError(f"augmentation {spec!r}: use a preset ({', '.join(PRESETS)}) or key=value pairs")
        k, v = item.split("=", 1)
        k = k.strip()
        if k not in AugmentConfig.__dataclass_fields__:
            raise ValueError(f"unknown augmentation parameter {k!r}")
        kwargs[k] = v.strip().lower() in ("1", "true", "yes") if k == "hflip" else float(v)
    return AugmentConfig(**kwargs)


def warp(x: np.ndarray, angle: float = 0.0, shear: float = 0.0, zoom: float = 1.0, tx: float = 0.0,
         ty: float = 0.0) -> np.ndarray:
    """Rotate/shear (radians), zoom (< 1 zooms out, black fill) and shift (pixels) about the centre."""
    h, w = x.shape
    # inverse map (output -> input) about the image centre, as PIL expects
    cos, sin = math.cos(angle), math.sin(angle)
    a, b = cos / zoom, (sin + math.tan(shear) * cos) / zoom
    d, e = -sin / zoom, (cos - math.tan(shear) * sin) / zoom
    cx, cy = w / 2, h / 2
    coeffs = (a, b, cx - a * cx - b * cy - tx, d, e, cy - d * cx - e * cy - ty)
    img = Image.fromarray(x.astype(np.float32), mode="F")
    return np.asarray(img.transform((w, h), Image.AFFINE, coeffs, resample=Image.BILINEAR, fill=0), dtype=np.float32)


class Augmenter:
    """Callable passed to ``preprocess(..., augment=...)``; seeded per worker."""

    def __init__(self, cfg: AugmentConfig, seed: int | None = None):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        c, rng = self.cfg, self.rng
        h, w = x.shape
        if c.rotation or c.shift or c.shear or c.zoom or c.zoom_in:
            angle = math.radians(rng.uniform(-c.rotation, c.rotation))
            shear = math.radians(rng.uniform(-c.shear, c.shear))
            zoom = rng.uniform(1 - c.zoom, 1 + max(c.zoom, c.zoom_in))
            tx = rng.uniform(-c.shift, c.shift) * w
            ty = rng.uniform(-c.shift, c.shift) * h
            x = warp(x, angle, shear, zoom, tx, ty)
        if c.hflip and rng.random() < 0.5:
            x = x[:, ::-1]
        if c.lowres and rng.random() < LOWRES_P:
            x = degrade_resolution(x, rng.uniform(c.lowres, 1.0))
        if c.gamma:
            x = np.clip(x, 0.0, 1.0) ** math.exp(rng.uniform(-c.gamma, c.gamma))
        if c.blur and rng.random() < 0.5:
            from scipy.ndimage import gaussian_filter

            sigma = rng.uniform(0.3, c.blur)
            soft = gaussian_filter(x, sigma)
            # half the time blur, half the time sharpen by the same amount
            x = soft if rng.random() < 0.5 else x + (x - soft)
        if c.contrast:
            m = float(x.mean())
            x = (x - m) * rng.uniform(1 - c.contrast, 1 + c.contrast) + m
        if c.brightness:
            x = x + rng.uniform(-c.brightness, c.brightness)
        return np.ascontiguousarray(x, dtype=np.float32)
