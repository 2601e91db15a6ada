"""Refusals: the one exception type for input the server will not classify.

Each refusal carries a stable machine-readable ``code`` (the web app translates
it) and an English ``message`` for the CLI and logs.
"""

from __future__ import annotations

# code -> default English message. The web app keeps translations keyed by code.
REFUSAL_CODES: dict[str, str] = {
    "empty_file": "The file is empty.",
    "not_an_image": "The file is not an image (expected JPEG, PNG, BMP, TIFF, WebP or DICOM).",
    "corrupt_image": "The image file is truncated or corrupt and cannot be decoded.",
    "unsupported_format": "The file is an image of a type this server does not accept (JPEG, PNG, BMP, TIFF, WebP or DICOM).",
    "invalid_dicom": "The DICOM header is inconsistent (impossible image size, bit depth or missing colour table).",
    "burned_in_annotation": "The DICOM says patient data is burned into the pixels; it cannot be stored de-identified.",
    "deidentification_failed": "The file could not be de-identified, so it was not stored.",
    "file_too_large": "The file is larger than the upload limit.",
    "too_many_pixels": "The image has more pixels than the safety limit (possible decompression bomb).",
    "image_too_small": "The image is too small to be a usable radiograph.",
    "unsupported_dicom": "The DICOM file has no pixel data this server can decode.",
    "not_xray_modality": "The DICOM file is not a radiograph (for example a CT or MR slice).",
    "lateral_view": "The image is a lateral view; a frontal (PA/AP) chest X-ray is required.",
    "not_chest": "The DICOM file is of another body part, not the chest.",
    "blank_image": "The image is blank or nearly uniform.",
    "color_photo": "The image is a colour photograph, not an X-ray.",
    "not_chest_xray": "The image does not look like a frontal chest X-ray.",
    "model_unavailable": "No model is available to classify the image right now.",
    "queued": "The image is queued for a model server; the result appears on the case when it is ready.",
    "busy": "Every model is busy with other uploads; the image is saved and will be analysed automatically.",
    "interrupted": "The analysis was interrupted (the server restarted); it will be analysed again automatically.",
}


class Refusal(Exception):
    """Input that will not be classified, with the reason."""

    def __init__(self, code: str, message: str | None = None):
        if code not in REFUSAL_CODES:
            raise ValueError(f"unknown refusal code {code!r}")
        self.code = code
        self.message = message or REFUSAL_CODES[code]
        super().__init__(self.message)

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


class ModelNotFound(FileNotFoundError):
    """No usable model: its file or card is missing, or the file is not a readable model."""
