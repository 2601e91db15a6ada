"""The one preprocessing function, shared by training and serving.

Training (``model_training``) and serving both call :func:`preprocess`; the
spec travels in the model card so that the server reproduces training exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    """How a gray image in [0, 1] becomes a model input tensor."""

    size: tuple[int, int] = (224, 224)  # (height, width); images are squashed, as the data were
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3  # gray replicated for ImageNet backbones
    resample: str = "bilinear"
    layout: str = field(default="NCHW")  # Keras models take NHWC

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        return cls(
            size=tuple(d.get("size", (224, 224))),
            mean=tuple(d.get("mean", IMAGENET_MEAN)),
            std=tuple(d.get("std", IMAGENET_STD)),
            channels=int(d.get("channels", 3)),
            resample=d.get("resample", "bilinear"),
            layout=d.get("layout", "NCHW"),
        )


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


def preprocess(
    gray: np.ndarray,
    spec: PreprocessSpec,
    augment: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Gray float image in [0, 1] (HxW) -> float32 model input (C,H,W or H,W,C).

    ``augment`` (training only) receives the resized gray image and returns one
    of the same shape; serving never passes it.
    """
    x = resize_gray(gray, spec.size, spec.resample)
    if augment is not None:
        x = augment(x)
    x = np.clip(x, 0.0, 1.0)
    mean = np.asarray(spec.mean, np.float32)[: spec.channels]
    std = np.asarray(spec.std, np.float32)[: spec.channels]
    chw = (np.repeat(x[None], spec.channels, axis=0) - mean[:, None, None]) / std[:, None, None]
    chw = chw.astype(np.float32)
    return chw.transpose(1, 2, 0).copy() if spec.layout == "NHWC" else chw
