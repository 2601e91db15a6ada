"""Decoding real X-rays in every supported format, and refusing hostile files."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from uplink_server.errors import Refusal
from uplink_server.imaging import decode


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def xray(one_xray) -> Image.Image:
    return Image.open(one_xray).convert("L")


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP", "JPEG"])
def test_formats_decode_to_same_gray(xray, fmt):
    ref = np.asarray(xray, np.float32) / 255
    kw = {"lossless": True} if fmt == "WEBP" else ({"quality": 95} if fmt == "JPEG" else {})
    img = decode(_bytes(xray, fmt, **kw))
    assert img.gray.shape == ref.shape
    assert np.abs(img.gray - ref).mean() < 0.01


def test_rgb_xray_is_gray_with_no_colour(one_xray):
    img = decode(one_xray)  # Kermany files are RGB JPEGs of gray X-rays
    assert img.gray.ndim == 2 and img.colorfulness < 0.02


def test_16bit_png_uses_its_range(xray):
    a12 = (np.asarray(xray, np.uint16) * 16).astype(np.uint16)  # 12-bit values in a 16-bit file
    img = decode(_bytes(Image.fromarray(a12), "PNG"))
    ref = np.asarray(xray, np.float32) / 255
    assert img.gray.max() > 0.95  # stretched to the used range, not left dark
    assert np.corrcoef(img.gray.ravel(), ref.ravel())[0, 1] > 0.999


def test_exif_orientation_is_honoured(xray):
    # a phone stores pixels rotated and an EXIF tag saying how to show them
    stored = xray.transpose(Image.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    img = decode(_bytes(stored, "JPEG", exif=exif, quality=95))
    ref = np.asarray(xray.transpose(Image.ROTATE_90).transpose(Image.ROTATE_270), np.float32) / 255
    assert img.gray.shape == ref.shape
    assert np.abs(img.gray - ref).mean() < 0.02


def test_colour_photo_measured(xray):
    rgb = np.stack([np.asarray(xray), np.zeros_like(np.asarray(xray)), 255 - np.asarray(xray)], axis=-1)
    img = decode(_bytes(Image.fromarray(rgb.astype(np.uint8)), "PNG"))
    assert img.colorfulness > 0.2


def test_rgb_gray_and_colourfulness_are_their_definitions(one_xray, xray):
    """ITU-R 601 luma in [0, 1] and the mean spread between a pixel's channels, on a real RGB film and a colour
    picture: the fast uint8 path gives what the float definition gives."""
    coloured = np.stack([np.asarray(xray), np.asarray(xray) // 3, 255 - np.asarray(xray)], axis=-1).astype(np.uint8)
    for data in (one_xray.read_bytes(), _bytes(Image.fromarray(coloured), "PNG")):
        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64) / 255
        img = decode(data)
        assert np.abs(img.gray - rgb @ [0.299, 0.587, 0.114]).max() < 1e-6 and img.gray.dtype == np.float32
        assert img.colorfulness == pytest.approx((rgb.max(axis=2) - rgb.min(axis=2)).mean(), abs=1e-9)


@pytest.mark.parametrize("data,code", [
    (b"", "empty_file"),
    (b"hello, this is a text file\n" * 20, "not_an_image"),
    (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + b"0" * 500, "not_an_image"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)), "not_an_image"),
])
def test_not_images_refused(data, code):
    with pytest.raises(Refusal) as e:
        decode(data)
    assert e.value.code == code


def test_truncated_jpeg_refused(one_xray):
    data = one_xray.read_bytes()
    with pytest.raises(Refusal) as e:
        decode(data[: len(data) // 3])
    assert e.value.code == "corrupt_image"


def _png_with_size(w: int, h: int) -> bytes:
    """A valid-looking PNG header claiming w x h pixels (a decompression bomb)."""
    small = _bytes(Image.new("L", (8, 8)), "PNG")
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return small[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + small[33:]


def test_decompression_bomb_refused_before_decoding():
    with pytest.raises(Refusal) as e:
        decode(_png_with_size(100_000, 100_000))
    assert e.value.code == "too_many_pixels"


def test_tiny_image_refused():
    with pytest.raises(Refusal) as e:
        decode(_bytes(Image.new("L", (10, 10), 128), "PNG"))
    assert e.value.code == "image_too_small"


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file"):
        decode(tmp_path / "nope.png")


# --- DICOM -----------------------------------------------------------------------

def make_dicom(gray_u8: np.ndarray, photometric: str = "MONOCHROME2", **attrs) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "HOSP-123456"
    ds.PatientBirthDate = "19800101"
    ds.InstitutionName = "Hospital General"
    ds.ViewPosition = "PA"
    px = gray_u8.astype(np.uint16) * 16  # 12-bit
    if photometric == "MONOCHROME1":
        px = 4095 - px
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = px.tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_monochrome1_is_inverted(xray):
    a = np.asarray(xray)
    g2 = decode(make_dicom(a, "MONOCHROME2")).gray
    g1 = decode(make_dicom(a, "MONOCHROME1")).gray
    assert np.abs(g1 - g2).max() < 1e-3
    assert np.corrcoef(g2.ravel(), a.ravel())[0, 1] > 0.999


def test_dicom_window_is_applied(xray):
    a = np.asarray(xray)
    full = decode(make_dicom(a)).gray
    narrow = decode(make_dicom(a, WindowCenter=2048, WindowWidth=1024)).gray
    # a narrow window saturates more pixels at black and white
    assert ((narrow < 0.01) | (narrow > 0.99)).mean() > ((full < 0.01) | (full > 0.99)).mean() + 0.05


def test_dicom_rle_compressed_decodes(xray):
    import pydicom
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.asarray(xray))))
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf)
    assert np.abs(decode(buf.getvalue()).gray - decode(make_dicom(np.asarray(xray))).gray).max() < 1e-6


def test_dicom_jpeg_baseline_decodes():
    from pydicom.data import get_testdata_file

    img = decode(open(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"), "rb").read())
    assert img.gray.shape == (100, 100)


@pytest.mark.parametrize("keep", [0.002, 0.004, 0.5, 0.9995])
def test_truncated_dicom_is_corrupt(xray, keep):
    # cut before the pixel data, inside it, and a few bytes short of the end
    raw = make_dicom(np.asarray(xray))
    with pytest.raises(Refusal) as e:
        decode(raw[: int(len(raw) * keep)])
    assert e.value.code == "corrupt_image"
    assert decode(raw).gray.shape == np.asarray(xray).shape


def test_truncated_compressed_dicom_is_corrupt():
    from pydicom.data import get_testdata_file

    raw = open(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"), "rb").read()
    with pytest.raises(Refusal) as e:
        decode(raw[: len(raw) - 60])
    assert e.value.code == "corrupt_image"


def test_dicom_without_image_is_unsupported():
    from pydicom.data import get_testdata_file

    with pytest.raises(Refusal) as e:
        decode(open(get_testdata_file("rtplan.dcm"), "rb").read())
    assert e.value.code == "unsupported_dicom"


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_ct_and_mr_refused(name):
    from pydicom.data import get_testdata_file

    with pytest.raises(Refusal) as e:
        decode(open(get_testdata_file(name), "rb").read())
    assert e.value.code == "not_xray_modality"


def test_lateral_dicom_refused(xray):
    with pytest.raises(Refusal) as e:
        decode(make_dicom(np.asarray(xray), ViewPosition="LL"))
    assert e.value.code == "lateral_view"
