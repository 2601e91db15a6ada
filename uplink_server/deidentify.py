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
disk and the classifier sees exactly the pixels it would have seen.

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
    ext: str  # ".dcm" or ".png"
    format: str  # what the upload was, by content: DICOM, JPEG, PNG, ...


def for_storage(image: DecodedImage, patient_code: str, uid_key: str) -> Stored:
    """De-identified bytes of a decoded upload (see the module docstring)."""
    if image.dataset is not None:
        return Stored(deidentify_dicom(image.dataset, patient_code, uid_key), ".dcm", "DICOM")
    if image.pil is None:
        raise Refusal("deidentification_failed", "nothing decoded to store")
    return Stored(clean_png(image.pil), ".png", image.format)


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
