"""Decoding uploads into a grayscale float image, safely.

Every failure becomes a :class:`~uplink_server.errors.Refusal`; nothing here
raises a raw decoder error to the caller.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import dicom
from .errors import Refusal
from .limits import MAX_BYTES, MAX_PIXELS, MIN_SIDE

# PIL raises DecompressionBombError at 2x its limit and only warns at 1x: we want a
# hard refusal at our own limit, so we check the header size ourselves.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


@dataclass
class DecodedImage:
    """A decoded upload: gray pixels in [0, 1] plus what the checks need."""

    gray: np.ndarray  # float32, HxW, 0 = black, 1 = white
    format: str
    colorfulness: float = 0.0  # mean chroma in [0, 1]; X-rays saved as RGB have ~0
    meta: dict = field(default_factory=dict)
    # what was decoded, for de-identified storage: the Pillow image (EXIF
    # rotation applied) or the pydicom Dataset
    pil: Image.Image | None = field(default=None, repr=False)
    dataset: object = field(default=None, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.gray.shape[1], self.gray.shape[0]


def read_bytes(source: str | Path | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    path = Path(source)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise FileNotFoundError(f"No such file: {path}") from exc
    if size > MAX_BYTES:
        raise Refusal("file_too_large", f"{path.name} is {size / 1e6:.1f} MB; the limit is {MAX_BYTES / 1e6:.0f} MB.")
    return path.read_bytes()


def _pil_to_gray(img: Image.Image) -> tuple[np.ndarray, float]:
    """Convert any PIL mode to gray float [0, 1]; also measure colourfulness."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if mode.startswith("I;16"):
            hi = 65535.0
        else:
            lo_, hi_ = float(arr.min()), float(arr.max())
            arr = arr - lo_
            hi = hi_ - lo_ or 1.0
        # 16-bit scans often use only 12 bits: stretch to the used range.
        used = float(arr.max())
        if used > 0 and used < hi:
            hi = used
        return np.clip(arr / hi, 0, 1).astype(np.float32), 0.0
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0, 0.0
    if mode == "LA":
        return np.asarray(img.getchannel(0), dtype=np.float32) / 255.0, 0.0
    # on the uint8 channels: numpy's reductions over a last axis of 3 on a float copy cost 5 ms of a 1 MP film
    # (16x this, BENCHMARKS.md issue 25); the values are the same to float rounding
    rgb = np.asarray(img.convert("RGB"))
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    gray = rgb.astype(np.float32) @ (np.array([0.299, 0.587, 0.114], np.float32) / np.float32(255.0))
    return gray, float(chroma.mean()) / 255.0


# What the decoders' own answers may be (Pillow's ``Image.format``, or DICOM);
# MPO is how Pillow names the multi-picture JPEGs some phone cameras write.
ACCEPTED_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "DICOM"}


def decode(source: str | Path | bytes) -> DecodedImage:
    """Decode JPEG/PNG/BMP/TIFF/WebP/DICOM bytes or a path into a gray image.

    The type comes from the content (pydicom's and Pillow's own reading), never
    from a file name.
    """
    data = read_bytes(source)
    if not data:
        raise Refusal("empty_file")
    if len(data) > MAX_BYTES:
        raise Refusal("file_too_large")
    ds = dicom.parse(data) if dicom.has_part10_header(data) else None
    if ds is not None:
        return _from_dicom(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            if fmt not in ACCEPTED_FORMATS:
                raise Refusal("unsupported_format", f"The file is a {fmt} image; upload JPEG, PNG, BMP, TIFF, WebP or DICOM.")
            _check_size(*img.size)
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img = ImageOps.exif_transpose(img)  # phones store rotation in EXIF
            img.load()
    except Refusal:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Refusal("too_many_pixels") from exc
    except UnidentifiedImageError as exc:
        ds = dicom.parse(data)  # pydicom reads DICOM without the 128-byte preamble
        if ds is not None:
            return _from_dicom(ds)
        raise Refusal("not_an_image") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Refusal("corrupt_image", f"The image file is truncated or corrupt: {exc}") from exc
    gray, colorfulness = _pil_to_gray(img)
    return DecodedImage(gray=gray, format=fmt, colorfulness=colorfulness, pil=img)


def _from_dicom(ds) -> DecodedImage:
    gray, meta = dicom.read_dicom(ds=ds)
    _check_size(gray.shape[1], gray.shape[0])
    return DecodedImage(gray=gray, format="DICOM", colorfulness=meta.pop("colorfulness", 0.0), meta=meta, dataset=ds)


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise Refusal("too_many_pixels", f"The image is {width}x{height} pixels; the limit is {MAX_PIXELS / 1e6:.0f} megapixels.")
    if min(width, height) < MIN_SIDE:
        raise Refusal("image_too_small", f"The image is only {width}x{height} pixels.")
