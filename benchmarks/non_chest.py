"""A set of images that are not frontal chest X-rays, for the refusal gate.

Everything here is available offline from installed packages:
- scikit-image's sample photographs and scans, each also in gray, inverted gray
  (a negative looks more like a radiograph) and rotated gray;
- pydicom's test images of other modalities (CT, MR, ultrasound, nuclear
  medicine, segmentation masks, secondary captures) exported as PNG, as
  they would arrive from a screenshot or a PACS export, also inverted;
- face photographs (scikit-image's LFW subset, enlarged), a rendered chart,
  noise, blank, gradient and stripe images.

Needs scikit-image and pydicom (the dev requirements).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

SKIMAGE_SAMPLES = [
    "astronaut", "camera", "coffee", "chelsea", "cat", "moon", "coins", "text", "page", "horse", "clock", "rocket",
    "checkerboard", "brick", "grass", "gravel", "immunohistochemistry", "hubble_deep_field", "retina",
    "motorcycle_left", "cell", "colorwheel", "logo", "microaneurysms", "shepp_logan_phantom", "binary_blobs",
]
PYDICOM_IMAGES = [
    "CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "MR_small.dcm", "MR_small_RLE.dcm",
    "examples_overlay.dcm", "JPEG2000.dcm", "image_dfl.dcm", "liver_1frame.dcm", "examples_palette.dcm",
    "examples_jpeg2k.dcm", "examples_rgb_color.dcm", "examples_ybr_color.dcm", "SC_rgb_jpeg.dcm",
]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _to_u8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        a = (255 * (a - a.min()) / max(1e-9, float(a.max() - a.min()))).astype(np.uint8)
    return a


def _with_variants(out: dict, name: str, a: np.ndarray, rotate: bool = True) -> None:
    out[name] = _png(a)
    gray = np.asarray(Image.fromarray(a).convert("L"))
    if a.ndim == 3:
        out[name + "-gray"] = _png(gray)
    out[name + "-gray-inverted"] = _png(255 - gray)
    if rotate:
        out[name + "-gray-rot90"] = _png(np.rot90(gray).copy())


def non_chest_images() -> dict[str, bytes]:
    """name -> PNG bytes."""
    import skimage.data as skdata
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    out: dict[str, bytes] = {}
    for n in SKIMAGE_SAMPLES:
        try:
            a = getattr(skdata, n)()
        except Exception:  # a sample that needs a download is left out
            continue
        a = _to_u8(a[..., :3] if a.ndim == 3 else a)
        if min(a.shape[:2]) >= 40:
            _with_variants(out, n, a)
    for i, face in enumerate(skdata.lfw_subset()[:6]):
        out[f"face-{i}"] = _png(np.asarray(Image.fromarray(_to_u8(face)).resize((200, 200), Image.BICUBIC)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in PYDICOM_IMAGES:
            path = get_testdata_file(f)
            if path is None:
                continue
            ds = dcmread(path)
            px = ds.pixel_array  # pydicom returns colour as RGB
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                px = px[0]
            if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
                from pydicom.pixels import apply_color_lut

                px = apply_color_lut(px, ds)
            a = _to_u8(px)
            if min(a.shape[:2]) < 256:  # small test slices, enlarged as a viewer or screenshot would show them
                scale = 256 / min(a.shape[:2])
                a = np.asarray(Image.fromarray(a).resize((round(a.shape[1] * scale), round(a.shape[0] * scale))))
            _with_variants(out, f + ".png", a, rotate=False)
    out.update(_chart())
    rng = np.random.default_rng(0)
    out["noise-gray"] = _png(rng.integers(0, 256, (256, 256), dtype=np.uint8))
    out["noise-smooth"] = _png(np.asarray(Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8))
                                          .resize((256, 256), Image.BICUBIC)))
    out["blank-white"] = _png(np.full((256, 256), 255, np.uint8))
    out["blank-black"] = _png(np.zeros((256, 256), np.uint8))
    out["gradient"] = _png(np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1)))
    out["stripes"] = _png(((np.arange(256)[:, None] // 16 % 2) * 255 * np.ones((1, 256))).astype(np.uint8))
    return out


def _chart() -> dict[str, bytes]:
    """A rendered line chart: a screenshot sent by mistake."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    x = np.linspace(0, 10, 200)
    ax.plot(x, np.sin(x))
    ax.plot(x, np.cos(x) * 0.5)
    ax.set_title("weekly cases")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    a = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return {"chart": _png(a), "chart-gray-inverted": _png(255 - np.asarray(Image.fromarray(a).convert("L")))}
