"""The one preprocessing function, shared by training and serving.

Training (``model_training``) and serving both call :func:`preprocess`; the
spec travels in the model card so that the server reproduces training exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .pixels import _RESAMPLE, clahe, equalize, resize_gray  # noqa: F401  (their public home was here)

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
    # Against the hospital shortcut (issue 16): machines differ in exposure curve and borders carry
    # text, markers and collimation. "equalize" maps the image through its own histogram so every
    # machine's output spans the same intensities ("clahe" then adds contrast-limited local equalisation);
    # ``crop`` cuts this share of each side before resizing; ``roi="lungs"`` reads only the box around the
    # lung field that the lung segmenter finds (uplink_server.lungfield), "lungmask" also blacks out what lies
    # outside the (slightly grown) lungs in that box: mediastinum, heart, markers, tubes.
    intensity: str = "none"  # none | equalize | clahe
    crop: float = 0.0
    roi: str = "frame"  # frame | lungs | lungmask

    def __post_init__(self):
        check_spec(self)

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
            intensity=d.get("intensity", "none"),
            crop=float(d.get("crop", 0.0)),
            roi=d.get("roi", "frame"),
        )


INTENSITY_MODES = ("none", "equalize", "clahe")
ROI_MODES = ("frame", "lungs", "lungmask")


def check_spec(spec: PreprocessSpec) -> None:
    if spec.intensity not in INTENSITY_MODES:
        raise ValueError(f"unknown intensity normalisation {spec.intensity!r}: use one of {', '.join(INTENSITY_MODES)}")
    if not 0.0 <= spec.crop < 0.5:
        raise ValueError(f"crop must be a share of each side in [0, 0.5), got {spec.crop}")
    if spec.roi not in ROI_MODES:
        raise ValueError(f"unknown region of interest {spec.roi!r}: use one of {', '.join(ROI_MODES)}")
    if spec.roi != "frame" and spec.crop:
        raise ValueError(f"crop and roi={spec.roi!r} both choose what the model sees: use one")


def crop_box(shape: tuple[int, int], crop: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the region the model sees in an image of ``shape``: heatmaps are
    drawn back into the same box."""
    h, w = shape
    dy, dx = int(round(h * crop)), int(round(w * crop))
    return dy, h - dy, dx, w - dx


def view_box(gray: np.ndarray, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the part of ``gray`` the model reads under ``spec``."""
    if spec.roi in ("lungs", "lungmask"):
        from .lungfield import lung_box

        return lung_box(gray)
    return crop_box(gray.shape, spec.crop)


def preprocess(
    gray: np.ndarray,
    spec: PreprocessSpec,
    augment: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Gray float image in [0, 1] (HxW) -> float32 model input (C,H,W or H,W,C).

    ``augment`` (training only) receives the resized gray image and returns one
    of the same shape; serving never passes it.
    """
    if spec.roi == "lungmask":
        from .lungfield import lung_field

        (top, bottom, left, right), soft = lung_field(gray)
        gray = (gray * soft)[top:bottom, left:right]
    elif spec.crop or spec.roi != "frame":
        top, bottom, left, right = view_box(gray, spec)
        gray = gray[top:bottom, left:right]
    x = resize_gray(gray, spec.size, spec.resample)
    if augment is not None:
        x = augment(x)
    x = np.clip(x, 0.0, 1.0)
    if spec.intensity == "equalize":  # after augmentation: machine-like exposure changes are undone as at serving
        x = equalize(x)
    elif spec.intensity == "clahe":
        x = clahe(x)
    mean = np.asarray(spec.mean, np.float32)[: spec.channels]
    std = np.asarray(spec.std, np.float32)[: spec.channels]
    chw = (np.repeat(x[None], spec.channels, axis=0) - mean[:, None, None]) / std[:, None, None]
    chw = chw.astype(np.float32)
    return chw.transpose(1, 2, 0).copy() if spec.layout == "NHWC" else chw
