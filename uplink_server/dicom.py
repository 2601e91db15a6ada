"""DICOM reading (modality/VOI LUT, MONOCHROME1) and de-identification."""

from __future__ import annotations

import io

import numpy as np

from .errors import Refusal

# Modalities that are cross-sectional or otherwise never a chest radiograph.
NON_RADIOGRAPH_MODALITIES = {"CT", "MR", "US", "NM", "PT", "OT_VIDEO", "XA", "MG", "IVUS", "OCT", "OP", "SM", "ECG"}
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLD", "RLD"}

# Attributes that identify a person or an institution (DICOM PS3.15 basic profile, abridged).
IDENTIFYING_KEYWORDS = [
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientAddress",
    "PatientTelephoneNumbers", "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence",
    "PatientMotherBirthName", "MedicalRecordLocator", "EthnicGroup", "Occupation",
    "AdditionalPatientHistory", "PatientComments", "ReferringPhysicianName", "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy", "OperatorsName", "PhysiciansOfRecord", "RequestingPhysician",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "AccessionNumber", "StudyID", "DeviceSerialNumber", "IssuerOfPatientID", "MilitaryRank",
    "BranchOfService", "PatientInsurancePlanCodeSequence", "RequestAttributesSequence",
    "StudyDescription", "PerformedProcedureStepDescription",
]


def is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - pydicom is a core dependency
        raise Refusal("unsupported_dicom", "pydicom is not installed; cannot read DICOM") from exc
    return pydicom


def read_dicom(data: bytes) -> tuple[np.ndarray, dict]:
    """Return (gray float32 image in [0, 1], metadata) from DICOM bytes.

    Applies the modality LUT (rescale slope/intercept), then the VOI LUT or
    window, and inverts MONOCHROME1 so that bone is always bright.
    """
    pydicom = _pydicom()
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        raise Refusal("corrupt_image", f"Unreadable DICOM file: {exc}") from exc

    meta = {
        "modality": str(ds.get("Modality", "") or ""),
        "view_position": str(ds.get("ViewPosition", "") or "").upper(),
        "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
        "body_part": str(ds.get("BodyPartExamined", "") or "").upper(),
    }
    if meta["modality"].upper() in NON_RADIOGRAPH_MODALITIES:
        raise Refusal("not_xray_modality", f"DICOM modality {meta['modality']} is not a radiograph.")
    if meta["view_position"] in LATERAL_VIEWS:
        raise Refusal("lateral_view")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PixelData" not in ds:
        if rows and cols or _is_image_storage(ds):  # an image was promised: the file was cut before its pixels
            raise Refusal("corrupt_image", "The DICOM file is truncated: its image data is missing.")
        raise Refusal("unsupported_dicom", "The DICOM file holds no image (no PixelData).")
    from .imaging import MAX_PIXELS

    if rows * cols * frames > MAX_PIXELS:
        raise Refusal("too_many_pixels")
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
    if meta["photometric"] in ("RGB", "YBR_FULL", "YBR_FULL_422") and arr.ndim == 3:
        gray = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        gray = apply_modality_lut(arr, ds)
        gray = apply_voi_lut(gray, ds, index=0)
        gray = np.asarray(gray, dtype=np.float32)
    lo, hi = float(np.min(gray)), float(np.max(gray))
    gray = (gray - lo) / (hi - lo) if hi > lo else np.zeros_like(gray, dtype=np.float32)
    if meta["photometric"] == "MONOCHROME1":
        gray = 1.0 - gray
    return gray.astype(np.float32), meta


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


def deidentify(data: bytes, patient_code: str = "ANONYMOUS") -> bytes:
    """Return DICOM bytes with identifying attributes removed or replaced.

    PatientName and PatientID become ``patient_code``; private tags are dropped;
    dates that could identify the person are blanked.
    """
    pydicom = _pydicom()
    ds = pydicom.dcmread(io.BytesIO(data))
    for kw in IDENTIFYING_KEYWORDS:
        if kw in ds:
            delattr(ds, kw)
    ds.PatientName = patient_code
    ds.PatientID = patient_code
    ds.remove_private_tags()
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime",
               "SeriesTime", "AcquisitionTime", "ContentTime"):
        if kw in ds:
            setattr(ds, kw, "")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "cxr-screening basic profile: identifying attributes removed"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()
