"""REST API under /api/v1: the same code path as the pages, JSON out."""

from __future__ import annotations

from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    HTTPException,
    Query,
    Request,
    UploadFile,
)
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session

from uplink_server import NOTICE

from ..cases import (
    UploadError,
    case_dict,
    classify_case,
    create_case,
    expand_uploads,
    export_csv,
    read_upload,
)
from ..db import User
from ..deps import api_user, get_db, lang_of
from ..i18n import refusal_text
from ..security import can
from .pages import _filtered, _get_case

router = APIRouter(tags=["api"])


class Refusal(BaseModel):
    code: str | None = None
    message: str | None = None


class CaseOut(BaseModel):
    id: int
    patient_code: str
    created_at: str
    filename: str
    status: str
    label: str | None
    probabilities: dict[str, float] | None
    uncertain: bool
    refused: bool
    refusal: Refusal | None
    risk: float | None
    model: str | None
    model_version: str | None
    served_by: str | None
    created_by: str | None


class PredictOut(CaseOut):
    case_id: int
    notice: str = NOTICE


@router.post("/predict", response_model=PredictOut, responses={
    413: {"description": "file too large"}, 415: {"description": "not an image type"},
    422: {"description": "refused: not a usable chest X-ray (JSON body holds the reason and the case id)"},
    503: {"description": "no model available (the upload is kept as a pending case)"}})
async def predict(request: Request, file: UploadFile = File(...), patient_code: str = Form(""),
                  user: User = Depends(api_user), db: Session = Depends(get_db)):
    """Classify one chest X-ray (JPEG, PNG, BMP, TIFF, WebP or DICOM)."""
    if not can(user.role, "upload"):
        raise HTTPException(403, "not allowed to upload")
    settings = request.app.state.settings
    try:
        items = expand_uploads([await read_upload(file, settings)], settings)
    except UploadError as exc:
        return JSONResponse({"detail": exc.message, "refusal": {"code": exc.code, "message": refusal_text(exc.code, lang_of(request), exc.message)}},
                            status_code=exc.status)
    if len(items) != 1:
        raise HTTPException(400, "send one image per request (ZIP archives are for the upload page)")
    case = create_case(db, settings, user, items[0], patient_code)
    if case.status == "pending":
        case = await classify_case(db, settings, request.app.state.router, case, user)
    body = {**case_dict(case), "case_id": case.id, "notice": NOTICE}
    if case.status == "refused":
        body["refusal"]["message"] = refusal_text(case.refusal_code, lang_of(request), case.refusal_message)
        return JSONResponse(body, status_code=413 if case.refusal_code == "file_too_large" else 422)
    if case.status == "pending":
        body["detail"] = "model unavailable: the image is saved as a pending case; retry later"
        return JSONResponse(body, status_code=503)
    return body


@router.get("/cases", response_model=list[CaseOut])
def list_cases(request: Request, q: str = "", date_from: str = "", date_to: str = "", limit: int = Query(100, le=1000),
               user: User = Depends(api_user), db: Session = Depends(get_db)):
    return [case_dict(c) for c in db.scalars(_filtered(db, user, q, date_from, date_to).limit(limit)).all()]


@router.get("/cases/{case_id}", response_model=CaseOut)
def get_case(case_id: int, user: User = Depends(api_user), db: Session = Depends(get_db)):
    return case_dict(_get_case(db, user, case_id))


@router.post("/cases/{case_id}/retry", response_model=CaseOut)
async def retry_case(case_id: int, request: Request, user: User = Depends(api_user), db: Session = Depends(get_db)):
    case = await classify_case(db, request.app.state.settings, request.app.state.router, _get_case(db, user, case_id), user)
    return case_dict(case)


@router.get("/export.csv")
def export(q: str = "", date_from: str = "", date_to: str = "", user: User = Depends(api_user), db: Session = Depends(get_db)):
    if not can(user.role, "export"):
        raise HTTPException(403, "not allowed to export")
    return Response(export_csv(db.scalars(_filtered(db, user, q, date_from, date_to)).all()), media_type="text/csv")


@router.get("/status")
def status(request: Request, user: User = Depends(api_user)):
    return {"model_available": request.app.state.router.available, **request.app.state.router.status()}
