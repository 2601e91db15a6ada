"""Creating and (re)classifying cases: the one code path behind pages and API."""

from __future__ import annotations

import csv
import io
import logging
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from uplink_server import dicom
from uplink_server.errors import Refusal
from uplink_server.imaging import decode

from .config import Settings
from .db import AuditLog, Case, User
from .inference import ModelRouter, ModelUnavailable

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom", ""}


class UploadError(ValueError):
    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass
class Upload:
    filename: str
    data: bytes


async def read_upload(f, settings: Settings) -> Upload:
    """Read at most the size limit (+1 byte to notice a larger file) into memory."""
    limit = settings.max_upload_mb * 1024 * 1024
    data = await f.read(limit + 1)
    if len(data) > limit:
        raise UploadError("file_too_large", f"{f.filename}: larger than {settings.max_upload_mb} MB", 413)
    return Upload(f.filename or "upload", data)


def expand_uploads(uploads: list[Upload], settings: Settings) -> list[Upload]:
    """Unpack ZIP archives (bounded) and reject obviously wrong file types."""
    out: list[Upload] = []
    limit = settings.max_upload_mb * 1024 * 1024
    for up in uploads:
        ext = Path(up.filename).suffix.lower()
        if ext == ".zip" or (up.data[:4] == b"PK\x03\x04" and ext not in IMAGE_EXTENSIONS - {""}):
            try:
                with zipfile.ZipFile(io.BytesIO(up.data)) as zf:
                    members = [m for m in zf.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX")
                               and not Path(m.filename).name.startswith(".")]
                    if len(members) > settings.max_zip_files:
                        raise UploadError("zip_error", f"the ZIP holds {len(members)} files; the limit is {settings.max_zip_files}", 413)
                    for m in members:
                        if m.file_size > limit:
                            raise UploadError("file_too_large", f"{m.filename} is too large", 413)
                        out.append(Upload(Path(m.filename).name, zf.read(m)))
            except zipfile.BadZipFile as exc:
                raise UploadError("zip_error", f"{up.filename}: not a readable ZIP file ({exc})", 400) from exc
            continue
        if ext not in IMAGE_EXTENSIONS:
            raise UploadError("unsupported_type", f"{up.filename}: unsupported file type {ext}", 415)
        out.append(up)
    if not out:
        raise UploadError("no_file", "no file was uploaded", 400)
    return out


def _preview_png(data: bytes, path: Path) -> bool:
    try:
        img = decode(data)
    except Refusal:
        return False
    gray = (img.gray * 255).clip(0, 255).astype("uint8")
    pil = Image.fromarray(gray)
    pil.thumbnail((1024, 1024))
    pil.save(path, format="PNG")
    return True


def create_case(db: Session, settings: Settings, user: User, upload: Upload, patient_code: str) -> Case:
    """Store the upload (DICOM de-identified first) and a pending case."""
    patient_code = (patient_code or "").strip()[:64]
    case = Case(patient_code=patient_code, created_by=user.id, filename=upload.filename[:255], status="pending", uncertain=False)
    data = upload.data
    if len(data) > settings.max_upload_mb * 1024 * 1024:
        case.status, case.refusal_code = "refused", "file_too_large"
        case.refusal_message = Refusal("file_too_large").message
        db.add(case)
        db.commit()
        return case
    if dicom.is_dicom(data):
        try:
            data = dicom.deidentify(data, patient_code or "ANONYMOUS")
        except Exception as exc:  # unreadable DICOM: keep nothing identifying, refuse
            case.status, case.refusal_code = "refused", "corrupt_image"
            case.refusal_message = f"Unreadable DICOM file: {exc}"
            db.add(case)
            db.commit()
            return case
    stem = uuid.uuid4().hex
    ext = ".dcm" if dicom.is_dicom(data) else (Path(upload.filename).suffix.lower() or ".bin")
    (settings.upload_dir / f"{stem}{ext}").write_bytes(data)
    case.image_path = f"{stem}{ext}"
    _preview_png(data, settings.upload_dir / f"{stem}.preview.png")
    db.add(case)
    db.commit()
    db.add(AuditLog(user_id=user.id, action="upload", case_id=case.id, detail={"filename": case.filename}))
    db.commit()
    return case


async def classify_case(db: Session, settings: Settings, router: ModelRouter, case: Case, user: User) -> Case:
    """Run the model on a stored case; a missing model leaves it pending, nothing lost."""
    if not case.image_path:
        return case
    data = (settings.upload_dir / case.image_path).read_bytes()
    try:
        outcome = await router.predict(data, case.filename)
    except ModelUnavailable:
        case.status, case.refusal_code = "pending", "model_unavailable"
        case.refusal_message = Refusal("model_unavailable").message
        db.commit()
        return case
    r = outcome.result
    case.model_name, case.model_version = r.get("model"), r.get("version")
    case.served_by, case.elapsed_ms = outcome.served_by, r.get("elapsed_ms")
    if r.get("refused"):
        case.status = "refused"
        case.refusal_code = (r.get("refusal") or {}).get("code")
        case.refusal_message = (r.get("refusal") or {}).get("message")
        case.label, case.probabilities, case.risk = None, None, None
    else:
        case.status = "done"
        case.refusal_code = case.refusal_message = None
        case.label, case.probabilities, case.uncertain = r["label"], r["probabilities"], bool(r.get("uncertain"))
        # risk for the worklist: probability of anything but normal
        case.risk = 1.0 - float(r["probabilities"].get("normal", 0.0))
        if outcome.heatmap_png:
            hp = Path(case.image_path).with_suffix("").name + ".heatmap.png"
            (settings.upload_dir / hp).write_bytes(outcome.heatmap_png)
            case.heatmap_path = hp
    db.add(AuditLog(user_id=user.id, action="classify", case_id=case.id,
                    detail={"status": case.status, "label": case.label, "model": case.model_name,
                            "version": case.model_version, "served_by": case.served_by}))
    db.commit()
    return case


def visible_cases(db: Session, user: User, can_view_all: bool):
    q = select(Case).order_by(Case.created_at.desc(), Case.id.desc())
    if not can_view_all:
        q = q.where(Case.created_by == user.id)
    return q


def case_dict(case: Case) -> dict:
    return {
        "id": case.id,
        "patient_code": case.patient_code,
        "created_at": case.created_at.isoformat() + "Z",
        "filename": case.filename,
        "status": case.status,
        "label": case.label,
        "probabilities": case.probabilities,
        "uncertain": case.uncertain,
        "refused": case.status == "refused",
        "refusal": {"code": case.refusal_code, "message": case.refusal_message} if case.refusal_code else None,
        "risk": case.risk,
        "model": case.model_name,
        "model_version": case.model_version,
        "served_by": case.served_by,
        "created_by": case.creator.email if case.creator else None,
    }


CSV_FIELDS = ["id", "patient_code", "created_at", "filename", "status", "label", "uncertain", "risk",
              "p_normal", "p_pneumonia", "p_covid19", "refusal_code", "model", "model_version", "created_by"]


def export_csv(cases) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for c in cases:
        d = case_dict(c)
        probs = c.probabilities or {}
        d.update({f"p_{k}": f"{v:.4f}" for k, v in probs.items()})
        d["refusal_code"] = c.refusal_code
        d["risk"] = "" if c.risk is None else f"{c.risk:.4f}"
        w.writerow(d)
    return buf.getvalue()
