"""DICOM: recognising it by content, reading pixels (modality/VOI LUT, palette,
MONOCHROME1) and refusing headers that cannot describe a real image.

De-identification lives in :mod:`uplink_server.deidentify`.
"""

from __future__ import annotations

import io

import numpy as np

from .errors import Refusal
from .limits import MAX_DECODED_BYTES, MAX_PIXELS

# Modalities that are cross-sectional or otherwise never a chest radiograph.
NON_RADIOGRAPH_MODALITIES = {"CT", "MR", "US", "NM", "PT", "OT_VIDEO", "XA", "MG", "IVUS", "OCT", "OP", "SM", "ECG"}
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLD", "RLD"}
# BodyPartExamined values of a chest film (PS3.16 CID 4031 and what X-ray units write); empty is accepted
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "CHEST_TO_PELVIS", "CHESTABDOMEN", "CHEST ABDOMEN", "BREAST_CHEST", "TORSO"}
# Attributes of which at least one is in any DICOM object worth reading: a file
# that pydicom parses "by force" without any of them is not DICOM.
_ANCHORS = ("SOPClassUID", "SOPInstanceUID", "Modality", "PixelData", "Rows", "StudyInstanceUID")
PHOTOMETRICS = {"MONOCHROME1": 1, "MONOCHROME2": 1, "RGB": 3, "YBR_FULL": 3, "YBR_FULL_422": 3, "PALETTE COLOR": 1,
                "YBR_ICT": 3, "YBR_RCT": 3, "YBR_PARTIAL_420": 3}


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - pydicom is a core dependency
        raise Refusal("unsupported_dicom", "pydicom is not installed; cannot read DICOM") from exc
    return pydicom


def has_part10_header(data: bytes) -> bool:
    """The 128-byte preamble and "DICM": a quick yes, never a sufficient no."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def parse(data: bytes):
    """A fully parsed pydicom Dataset, or None when the bytes are not DICOM.

    Files without the preamble (valid Part 10 content or a bare dataset, as many
    tools write them) are read with ``force`` and accepted only if they parse
    to the end and hold an attribute every DICOM object has. A file with the
    "DICM" header that does not parse raises a corrupt-image refusal.
    """
    pydicom = _pydicom()
    part10 = has_part10_header(data)
    if not part10 and (data[:1] not in (b"\x02", b"\x08", b"\x10", b"\x18", b"\x20", b"\x28") or data[1:2] != b"\x00"):
        return None  # a bare little-endian dataset starts with a low even group (tags ascend)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not part10)
        for elem in ds.iterall():  # values are parsed lazily: parse them all now
            _ = elem.value
    except Exception as exc:
        if part10:
            raise Refusal("corrupt_image", f"Unreadable DICOM file: {exc}") from exc
        return None
    if not part10 and not any(k in ds for k in _ANCHORS):
        return None
    _name_transfer_syntax(ds)
    return ds


def _name_transfer_syntax(ds) -> None:
    """A bare dataset has no file meta: record the encoding pydicom found, so
    that its pixels decode and it can be written back as a Part 10 file."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = getattr(ds, "original_encoding", (False, True))
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian) if little else ExplicitVRBigEndian


def is_dicom(data: bytes) -> bool:
    """Decided by content: pydicom's own reading, not a 4-byte check."""
    try:
        return parse(data) is not None
    except Refusal:
        return True  # "DICM" header present but broken: DICOM, and corrupt


def read_dicom(data: bytes | None = None, ds=None) -> tuple[np.ndarray, dict]:
    """Return (gray float32 image in [0, 1], metadata) from DICOM bytes or a Dataset.

    Applies the modality LUT (rescale slope/intercept), then the VOI LUT or
    window, maps PALETTE COLOR through its lookup table, and inverts
    MONOCHROME1 so that bone is always bright.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    if ds is None:
        ds = parse(data)
        if ds is None:
            raise Refusal("not_an_image")
    meta = {
        "modality": str(ds.get("Modality", "") or ""),
        "view_position": str(ds.get("ViewPosition", "") or "").upper(),
        "photometric": str(ds.get("PhotometricInterpretation", "") or "").strip().upper(),
        "body_part": str(ds.get("BodyPartExamined", "") or "").upper(),
    }
    if meta["modality"].upper() in NON_RADIOGRAPH_MODALITIES:
        raise Refusal("not_xray_modality", f"DICOM modality {meta['modality']} is not a radiograph.")
    if meta["view_position"] in LATERAL_VIEWS:
        raise Refusal("lateral_view")
    if meta["body_part"] and meta["body_part"] not in CHEST_BODY_PARTS:
        raise Refusal("not_chest", f"The DICOM says the body part is {meta['body_part']}, not the chest.")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PixelData" not in ds:
        if rows and cols or _is_image_storage(ds):  # an image was promised: the file was cut before its pixels
            raise Refusal("corrupt_image", "The DICOM file is truncated: its image data is missing.")
        raise Refusal("unsupported_dicom", "The DICOM file holds no image (no PixelData).")
    check_geometry(ds, rows, cols, frames, meta["photometric"])
    if rows * cols * frames > MAX_PIXELS:
        raise Refusal("too_many_pixels")
    # what decoding would allocate, not just the pixel count: an RLE or JPEG file of a few MB can promise a
    # 7000 x 7000 RGB 16-bit image (294 MB raw, gigabytes through the LUTs); refused before any decompression
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    decoded = rows * cols * frames * samples * max(1, (bits + 7) // 8)
    if decoded > MAX_DECODED_BYTES:
        raise Refusal("too_many_pixels", f"The DICOM image would decode to {decoded / 1e6:.0f} MB ({cols}x{rows}, "
                                         f"{frames} frame(s), {samples} sample(s) of {bits} bits); the limit is "
                                         f"{MAX_DECODED_BYTES / 1e6:.0f} MB.")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    _check_pixel_data_length(ds, ts, rows, cols, frames)
    try:
        arr = ds.pixel_array
    except Exception as exc:
        if ts is not None and _decoder_available(ts):  # we could decode this syntax, so the data itself is broken
            raise Refusal("corrupt_image", f"The DICOM pixel data is corrupt or truncated: {exc}") from exc
        raise Refusal(
            "unsupported_dicom",
            f"Cannot decode DICOM pixel data (transfer syntax {ts or 'unknown'}): {exc}",
        ) from exc
    if frames > 1:
        arr = arr[0]  # multi-frame: the first frame is the radiograph
    if arr.shape[:2] != (rows, cols):
        raise Refusal("invalid_dicom", f"The DICOM pixel data is {arr.shape[1]}x{arr.shape[0]}, the header says {cols}x{rows}.")
    colorfulness = 0.0
    if meta["photometric"] == "PALETTE COLOR":
        try:
            rgb = np.asarray(apply_color_lut(arr, ds), dtype=np.float32)
        except Exception as exc:  # a LUT that does not fit its pixels
            raise Refusal("invalid_dicom", f"The DICOM colour lookup table cannot be applied: {exc}") from exc
        rgb = rgb / max(float(rgb.max()), 1.0)
        colorfulness = float((rgb.max(axis=2) - rgb.min(axis=2)).mean())
        gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    elif arr.ndim == 3:
        rgb = arr[..., :3].astype(np.float32)
        rgb = rgb / max(float(rgb.max()), 1.0)
        colorfulness = float((rgb.max(axis=2) - rgb.min(axis=2)).mean())
        gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        gray = apply_modality_lut(arr, ds)
        gray = apply_voi_lut(gray, ds, index=0)
        gray = np.asarray(gray, dtype=np.float32)
    lo, hi = float(np.min(gray)), float(np.max(gray))
    gray = (gray - lo) / (hi - lo) if hi > lo else np.zeros_like(gray, dtype=np.float32)
    if meta["photometric"] == "MONOCHROME1":
        gray = 1.0 - gray
    meta["colorfulness"] = colorfulness
    return gray.astype(np.float32), meta


def check_geometry(ds, rows: int, cols: int, frames: int, photometric: str) -> None:
    """Refuse headers that cannot describe a real image, with the reason."""
    if rows < 1 or cols < 1:
        raise Refusal("invalid_dicom", f"The DICOM header gives an impossible image size: {cols} x {rows} pixels.")
    if frames < 1:
        raise Refusal("invalid_dicom", f"The DICOM header gives {frames} frames.")
    bits = int(ds.get("BitsAllocated", 0) or 0)
    stored = int(ds.get("BitsStored", bits) or bits)
    if bits not in (1, 8, 16, 32, 64) or not 1 <= stored <= bits:
        raise Refusal("invalid_dicom", f"The DICOM header gives an impossible bit depth ({stored} of {bits} bits).")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    want = PHOTOMETRICS.get(photometric)
    if want is None:
        raise Refusal("invalid_dicom", f"Unknown DICOM photometric interpretation {photometric or '(none)'}.")
    if samples != want:
        raise Refusal("invalid_dicom", f"{photometric} needs {want} sample(s) per pixel; the header gives {samples}.")
    if photometric == "PALETTE COLOR":
        missing = [f"{c}PaletteColorLookupTable{part}" for c in ("Red", "Green", "Blue") for part in ("Descriptor", "Data")
                   if f"{c}PaletteColorLookupTable{part}" not in ds]
        segmented = all(f"Segmented{c}PaletteColorLookupTableData" in ds for c in ("Red", "Green", "Blue"))
        if missing and not (segmented and not any("Descriptor" in m for m in missing)):
            raise Refusal("invalid_dicom", "This PALETTE COLOR DICOM has no colour lookup table "
                                           f"(missing {', '.join(missing[:2])}{'...' if len(missing) > 2 else ''}).")


def _check_pixel_data_length(ds, ts, rows: int, cols: int, frames: int) -> None:
    """Uncompressed pixel data shorter than the header promises means a cut file.

    pydicom reads a truncated element leniently, so the length is checked here.
    """
    if ts is None or getattr(ts, "is_compressed", True):
        return
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    expected = rows * cols * frames * samples * bits // 8
    if len(ds.PixelData) < expected:
        raise Refusal("corrupt_image",
                      f"The DICOM file is truncated: {len(ds.PixelData)} of {expected} bytes of image data.")


def _is_image_storage(ds) -> bool:
    sop = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    return "Image Storage" in str(getattr(sop, "name", ""))


def _decoder_available(ts) -> bool:
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(ts).is_available)
    except Exception:
        return False
