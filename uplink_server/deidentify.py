"""De-identification of an upload before anything of it is stored.

DICOM follows the Basic Application Level Confidentiality Profile of DICOM
PS3.15 Annex E. Which attributes the profile lists and what it does to each is
data, read from the maintained ``dicom-anonymizer`` package (its table of the
2026c edition of the standard); this module applies that table at every depth
of sequences, removes private tags everywhere, replaces UIDs consistently
(a keyed hash: the same original UID always gives the same new one at a site,
and cannot be turned back without the site's key), refuses images whose header
says patient data is burned into the pixels, and records what was done in
PatientIdentityRemoved / DeidentificationMethod(CodeSequence).

Raster images (JPEG, PNG, ...) are stored as a lossless PNG of the decoded
pixels, so EXIF, XMP, ICC profiles, text chunks and comments never reach the
disk and the classifier sees exactly the pixels it would have seen. A JPEG
without EXIF (what X-ray workstations export) is kept as its own compressed
data with every application segment but JFIF's and Adobe's, and every comment,
dropped; a PNG keeps only the chunks its pixels need: the same pixels, and no
PNG encoding on the upload path (issue 25).

Anything that cannot be de-identified raises a Refusal and must not be stored.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import uuid
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .errors import Refusal
from .imaging import DecodedImage

PROFILE_TABLE = "dicomfields_2026c"
# DeidentificationMethod is LO (64 characters a value), so several values
METHOD = ["DICOM PS3.15 Annex E Basic Confidentiality Profile", f"dicom-anonymizer table {PROFILE_TABLE}", "cxr-screening"]
# DICOM's code for the profile (CID 7050, De-identification Method)
PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")

# The table's categories -> the one action we take. Where the profile lets the
# implementer choose (X/Z, X/D, X/Z/D: "remove unless the IOD needs it") we
# remove: a stored screening image needs none of those attributes.
_CATEGORY_ACTION = {
    "D_TAGS": "D", "Z_D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X", "X_Z_TAGS": "X", "X_D_TAGS": "X", "X_Z_D_TAGS": "X", "X_Z_U_STAR_TAGS": "X",
    "U_TAGS": "U",
}
_TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}
_DUMMY = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "DS": "0", "IS": "0", "AS": "000Y",
          "UR": "http://removed.invalid"}


@dataclass(frozen=True)
class Profile:
    exact: dict  # (group, element) -> action letter
    masked: tuple  # ((group, element, group_mask, element_mask), action) for repeating groups

    def action(self, tag) -> str | None:
        key = (tag.group, tag.element)
        if key in self.exact:
            return self.exact[key]
        for (g, e, gm, em), act in self.masked:
            if tag.group & gm == g & gm and tag.element & em == e & em:
                return act
        return None


@lru_cache(maxsize=1)
def profile() -> Profile:
    try:
        from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
    except ImportError as exc:  # a core dependency: without the table nothing is stored
        raise Refusal("deidentification_failed", "dicom-anonymizer is not installed; DICOM cannot be de-identified") from exc
    table = dicom_anonymization_database_selector(PROFILE_TABLE)
    exact, masked = {}, []
    for category, action in _CATEGORY_ACTION.items():
        for tag in table[category]:
            if len(tag) == 2:
                exact[tuple(tag)] = action
            else:
                masked.append((tuple(tag), action))
    return Profile(exact, tuple(masked))


@dataclass
class Stored:
    """What may be written to disk: de-identified bytes and their extension."""

    data: bytes
    ext: str  # ".dcm", ".jpg" or ".png"
    format: str  # what the upload was, by content: DICOM, JPEG, PNG, ...


def for_storage(image: DecodedImage, patient_code: str, uid_key: str, data: bytes | None = None) -> Stored:
    """De-identified bytes of a decoded upload (see the module docstring); ``data``, the upload's own bytes, lets a
    JPEG keep its compressed data."""
    if image.dataset is not None:
        return Stored(deidentify_dicom(image.dataset, patient_code, uid_key), ".dcm", "DICOM")
    if image.pil is None:
        raise Refusal("deidentification_failed", "nothing decoded to store")
    if data is not None and image.format in ("JPEG", "PNG"):
        stripped = strip_jpeg(data) if image.format == "JPEG" else strip_png(data)
        if stripped is not None:
            return Stored(stripped, ".jpg" if image.format == "JPEG" else ".png", image.format)
    return Stored(clean_png(image.pil), ".png", image.format)


# PNG chunks a stripped file keeps: what the pixels need. Text, EXIF, ICC, time and the rest go.
_KEPT_PNG = {b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"}


def strip_png(data: bytes) -> bytes | None:
    """The PNG's own compressed pixels with every other chunk dropped, or None where this does not apply (EXIF,
    whose orientation must be applied; an animation; anything malformed)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    out, i, n = [data[:8]], 8, len(data)
    while i + 12 <= n:
        length = int.from_bytes(data[i:i + 4], "big")
        kind = data[i + 4:i + 8]
        end = i + 12 + length
        if end > n:
            return None
        if kind in (b"eXIf", b"acTL"):
            return None
        if kind in _KEPT_PNG:
            out.append(data[i:end])  # length, type, data and CRC as they came
        i = end
        if kind == b"IEND":
            return b"".join(out)
    return None


# JPEG segments a stripped file keeps: APP0 (JFIF: version and pixel density) and APP14 (Adobe: the colour
# transform, needed to decode some files); every other APPn (EXIF, XMP, ICC, vendor data) and COM go.
_KEPT_APP = (0xE0, 0xEE)


def strip_jpeg(data: bytes) -> bytes | None:
    """The JPEG's compressed data with its metadata dropped, or None where the fast path does not apply (EXIF
    present: its orientation must be applied to the pixels; anything the walk over the markers does not
    understand). The pixels are untouched: no decoding, no re-encoding."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return None
    out, i = [b"\xff\xd8"], 2
    while i < n:
        if data[i] != 0xFF:
            return None
        while i < n and data[i] == 0xFF:  # fill bytes before a marker
            i += 1
        if i >= n:
            return None
        marker = data[i]
        i += 1
        if marker == 0xD9:  # end of image: anything after it is dropped too
            out.append(b"\xff\xd9")
            return b"".join(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            out.append(bytes((0xFF, marker)))
            continue
        if i + 2 > n:
            return None
        end = i + int.from_bytes(data[i:i + 2], "big")
        if end > n or end < i + 2:
            return None
        if marker == 0xE1 and data[i + 2:i + 8] == b"Exif\x00\x00":
            return None
        if not ((0xE0 <= marker <= 0xEF and marker not in _KEPT_APP) or marker == 0xFE):
            out.append(bytes((0xFF, marker)) + data[i:end])
        i = end
        if marker == 0xDA:  # a scan: entropy-coded data up to the next marker that is not stuffing or a restart
            j = i
            while True:
                j = data.find(b"\xff", j)
                if j < 0 or j + 1 >= n:
                    return None
                nxt = data[j + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
                    j += 2
                    continue
                if nxt == 0xFF:
                    j += 1
                    continue
                break
            out.append(data[i:j])
            i = j
    return None


# --- DICOM ------------------------------------------------------------------------

def new_uid(uid: str, key: str) -> str:
    """2.25.<UUID> (ISO/IEC 9834-8) from a keyed hash of the original UID."""
    digest = hmac.new(key.encode(), str(uid).encode(), hashlib.sha256).digest()
    return "2.25." + str(uuid.UUID(bytes=digest[:16], version=4).int)


def deidentify_dicom(ds, patient_code: str, uid_key: str) -> bytes:
    """Apply the profile to a parsed Dataset (in place) and return Part 10 bytes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import SecondaryCaptureImageStorage

    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise Refusal("burned_in_annotation", "The DICOM says patient data is burned into the image "
                      "(BurnedInAnnotation = YES). Export the image without annotations, or a de-identified copy.")
    try:
        transfer_syntax = ds.file_meta.TransferSyntaxUID
        sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        sop_instance = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")
        _apply(ds, profile(), uid_key)
        ds.remove_private_tags()  # walks every sequence
        code = (patient_code or "").strip() or "ANONYMOUS"
        ds.PatientName = code
        ds.PatientID = code
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = PROFILE_CODE
        ds.DeidentificationMethodCodeSequence = Sequence([item])
        ds.LongitudinalTemporalInformationModified = "REMOVED"
        # a new file meta group: nothing of the sender's (AE titles, names of tools) survives
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = transfer_syntax
        meta.MediaStorageSOPClassUID = sop_class or SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or (new_uid(sop_instance, uid_key) if sop_instance
                                                                         else new_uid(ds.get("PixelData", b"")[:4096].hex(), uid_key))
        ds.file_meta = meta
        ds.preamble = b"\0" * 128
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    except Refusal:
        raise
    except Exception as exc:  # fail closed: an object we cannot rewrite is not stored
        raise Refusal("deidentification_failed", f"The DICOM file could not be de-identified ({exc}); it was not stored.") from exc
    return out.getvalue()


def _apply(ds, prof: Profile, uid_key: str) -> None:
    for elem in list(ds):
        if elem.tag.is_private:
            continue  # removed afterwards, at every depth
        action = prof.action(elem.tag)
        if action is None and elem.VR == "PN":
            action = "Z"  # no person's name is needed to read a radiograph, listed or not
        if action is None:
            if elem.VR == "SQ":
                for item in elem.value:
                    _apply(item, prof, uid_key)
            continue
        if action == "X":
            del ds[elem.tag]
        elif action == "Z":
            elem.value = [] if elem.VR == "SQ" else None
        elif action == "U" or (action == "D" and elem.VR == "UI"):
            if elem.VM > 1:
                elem.value = [new_uid(v, uid_key) for v in elem.value]
            elif elem.value:
                elem.value = new_uid(elem.value, uid_key)
        elif action == "D":
            elem.value = _dummy(elem.VR)


def _dummy(vr: str):
    if vr == "SQ":
        return []
    if vr in _TEXT_VRS:
        return "REMOVED"
    if vr in _DUMMY:
        return _DUMMY[vr]
    if vr in ("OB", "OW", "UN", "OD", "OF", "OL", "OV"):
        return b"\0\0"
    return 0  # US, SS, UL, SL, FL, FD, ...


# --- raster images ----------------------------------------------------------------

def clean_png(img: Image.Image) -> bytes:
    """A lossless PNG of the pixels only (EXIF rotation already applied)."""
    mode = img.mode
    if mode in ("1", "L", "LA", "RGB", "RGBA", "P", "I;16"):
        out = img.copy()
    elif mode.startswith("I;16"):
        out = Image.fromarray(np.asarray(img, dtype=np.uint16))
    elif mode in ("I", "F"):  # 32-bit: stretch to 16 bits as decoding would
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        out = Image.fromarray(np.round((a - lo) / ((hi - lo) or 1.0) * 65535).astype(np.uint16))
    else:  # CMYK, YCbCr, LAB, HSV
        out = img.convert("RGB")
    out.info = {}  # Pillow writes icc_profile, exif and text from info otherwise
    buf = io.BytesIO()
    out.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
