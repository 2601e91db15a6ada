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
from uplink_server.stages import CLOCK

from .. import audit
from ..cases import (
    OFFICE_DOCUMENT,
    REFUSAL_STATUS,
    UploadError,
    analyse_upload,
    case_dict,
    check_patient_codes,
    classify_case,
    expand_uploads,
    export_csv,
    is_zip,
    office_document,
    read_upload,
)
from ..db import User
from ..deps import api_user, get_db, lang_of
from ..i18n import next_step, refusal_text
from ..queries import audit_query, filtered_cases, visible_case
from ..recalibration import CalibrationError, calibration_dict, current_threshold, readiness
from ..recalibration import apply as apply_calibration
from ..recalibration import preview as preview_calibration
from ..recalibration import rollback as rollback_calibration
from ..recalibration import versions as calibration_versions
from ..reviews import (
    ReviewError,
    add_review,
    card_references,
    history,
    may_see_performance,
    model_key,
    performance,
    review_dict,
)
from ..security import can
from ..site_data import export_response

router = APIRouter(tags=["api"])


class Refusal(BaseModel):
    code: str | None = None
    message: str | None = None
    next_step: str | None = None


class ReviewIn(BaseModel):
    reading: str  # normal, pneumonia, covid19, other, not_assessable
    agrees: bool | None = None  # with the AI; left out: whether the reading is the AI's class
    note: str = ""


class ReviewOut(BaseModel):
    id: int
    reading: str
    agrees: bool
    note: str
    reviewer: str | None
    created_at: str


class TriageOut(BaseModel):
    needs_read: bool  # the first line a user reads: "Needs a doctor's read" / "No abnormality found by the model"
    score: float | None  # 1 - p(normal) as shown (after any site calibration)
    threshold: float | None  # the model card's operating point; None for models without one
    rule: str


class CaseOut(BaseModel):
    id: int
    patient_code: str
    created_at: str
    filename: str
    status: str
    label: str | None
    probabilities: dict[str, float] | None
    uncertain: bool
    margin: float | None = None
    refused: bool
    refusal: Refusal | None
    risk: float | None
    triage: TriageOut | None = None  # None while pending or refused
    model: str | None
    model_version: str | None
    served_by: str | None
    created_by: str | None
    calibration_version: int | None = None  # the site calibration this result used (None: the model card's)
    review: ReviewOut | None = None  # the doctor's newest reading


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
        check_patient_codes(patient_code)
        upload = await read_upload(file, settings)
        if is_zip(upload):  # refused before anything is unpacked: one image per request here
            if office_document(upload):
                raise UploadError("unsupported_type", f"{upload.filename}: {OFFICE_DOCUMENT}", 415)
            raise UploadError("zip_error", "send one image per request (ZIP archives are for the upload page)", 400)
        items = expand_uploads([upload], settings)
    except UploadError as exc:
        return JSONResponse({"detail": exc.message, "refusal": {"code": exc.code, "message": refusal_text(exc.code, lang_of(request), exc.message),
                                                                "next_step": next_step(exc.code, lang_of(request))}},
                            status_code=exc.status)
    if len(items) != 1:
        raise HTTPException(400, "send one image per request (ZIP archives are for the upload page)")
    # decoding and de-identifying is CPU work: off the event loop
    case = await analyse_upload(db, settings, request.app.state.router, user, items[0], patient_code)
    body = {**case_dict(case), "case_id": case.id, "notice": NOTICE}
    if case.status == "refused":
        body["refusal"]["message"] = refusal_text(case.refusal_code, lang_of(request), case.refusal_message)
        body["refusal"]["next_step"] = next_step(case.refusal_code, lang_of(request))
        return JSONResponse(body, status_code=REFUSAL_STATUS.get(case.refusal_code, 422))
    if case.status == "pending" and case.refusal_code == "queued":
        body["detail"] = "queued for a model server: the result is written to the case when ready (GET /api/v1/cases/{id})"
        return JSONResponse(body, status_code=202)
    if case.status == "pending" and case.refusal_code == "busy":
        body["detail"] = ("every model is busy: the image is saved as a pending case and analysed automatically; "
                          "GET /api/v1/cases/{id} later")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "10"})
    if case.status == "pending":
        body["detail"] = "model unavailable: the image is saved as a pending case; retry later"
        return JSONResponse(body, status_code=503, headers={"Retry-After": "30"})
    return body


@router.get("/cases", response_model=list[CaseOut])
def list_cases(request: Request, q: str = "", date_from: str = "", date_to: str = "", limit: int = Query(100, ge=1, le=1000),
               offset: int = Query(0, ge=0), user: User = Depends(api_user), db: Session = Depends(get_db)):
    """Newest first; page with ``offset``."""
    query = filtered_cases(db, user, q, date_from, date_to).limit(limit).offset(offset)
    return [case_dict(c) for c in db.scalars(query).all()]


@router.get("/cases/{case_id}", response_model=CaseOut)
def get_case(case_id: int, request: Request, user: User = Depends(api_user), db: Session = Depends(get_db)):
    case = visible_case(db, user, case_id)
    audit.record(db, "case_view", user, request, case_id=case.id, page="api")
    return case_dict(case)


@router.post("/cases/{case_id}/retry", response_model=CaseOut)
async def retry_case(case_id: int, request: Request, user: User = Depends(api_user), db: Session = Depends(get_db)):
    case = await classify_case(db, request.app.state.settings, request.app.state.router, visible_case(db, user, case_id), user)
    return case_dict(case)


@router.post("/cases/{case_id}/review", response_model=CaseOut, status_code=201, responses={
    403: {"description": "your role may not review"}, 404: {"description": "no such case"},
    422: {"description": "unknown reading, a refused or pending case, or a note too long: nothing is written"}})
def review_case(case_id: int, body: ReviewIn, request: Request, user: User = Depends(api_user), db: Session = Depends(get_db)):
    """Record the doctor's reading of a case. Earlier readings are kept as history (GET .../reviews)."""
    case = visible_case(db, user, case_id)
    try:
        review = add_review(db, case, user, body.reading, body.agrees, body.note)
    except ReviewError as exc:
        raise HTTPException(exc.status, exc.message) from None
    audit.record(db, "review", user, request, case_id=case.id, reading=review.reading, agrees=review.agrees, via="api")
    db.refresh(case)
    return case_dict(case)


@router.get("/cases/{case_id}/reviews", response_model=list[ReviewOut])
def case_reviews(case_id: int, user: User = Depends(api_user), db: Session = Depends(get_db)):
    """Every reading of a case, newest first."""
    return [review_dict(r) for r in history(db, visible_case(db, user, case_id).id)]


@router.get("/performance")
def site_performance(request: Request, user: User = Depends(api_user), db: Session = Depends(get_db)):
    """How the model does at this site against the doctors' readings, per model version."""
    if not may_see_performance(db, user):
        raise HTTPException(403, "your role may not see the site's performance (an admin can allow technicians)")
    audit.record(db, "performance_view", user, request, via="api")
    return performance(db, card_references(request.app.state.router.local))


@router.get("/site-export.zip", responses={200: {"content": {"application/zip": {}}}})
def site_export(request: Request, user: User = Depends(api_user), db: Session = Depends(get_db)):
    """The reviewed cases as training data: images (de-identified, as stored) and manifest.csv (path, label from
    the doctor's newest reading, patient code as patient_id, source = site)."""
    return export_response(request, user, db, via="api")


class CalibrationIn(BaseModel):
    model: str | None = None  # "name version"; default: the web app's own model
    apply: bool = False  # False: preview only


def _calibration_model(request: Request, model: str | None) -> str:
    local = request.app.state.router.local
    key = model or (model_key(local.name, local.version) if local is not None else "")
    if not key:
        raise HTTPException(422, "name the model (\"name version\"): this web app has no model of its own")
    return key


@router.get("/calibration")
def calibration_status(request: Request, model: str | None = None, user: User = Depends(api_user), db: Session = Depends(get_db)):
    """Reviewed cases per class against the minimum, and every site calibration version of the model."""
    if not can(user.role, "admin"):
        raise HTTPException(403, "only admins recalibrate")
    key = _calibration_model(request, model)
    return {"model": key, "readiness": readiness(db, key), "versions": [calibration_dict(c) for c in calibration_versions(db, key)]}


@router.post("/calibration")
def recalibrate(body: CalibrationIn, request: Request, user: User = Depends(api_user), db: Session = Depends(get_db)):
    """Preview (``apply: false``) or apply a temperature and margin fitted on half the reviewed cases and checked on
    the other half. Refused (422, nothing written) with too few cases or when the check gets worse."""
    if not can(user.role, "admin"):
        raise HTTPException(403, "only admins recalibrate")
    key = _calibration_model(request, body.model)
    try:
        if not body.apply:
            return {"preview": preview_calibration(db, key, current_threshold(db, key, request.app.state.router.local))}
        cal = apply_calibration(db, key, user, current_threshold(db, key, request.app.state.router.local))
    except CalibrationError as exc:
        raise HTTPException(exc.status, exc.message) from None
    audit.record(db, "recalibrate", user, request, model=key, version=cal.version, via="api")
    return {"applied": calibration_dict(cal)}


@router.post("/calibration/rollback")
def calibration_rollback(body: CalibrationIn, request: Request, user: User = Depends(api_user), db: Session = Depends(get_db)):
    """Undo the active site calibration; the one before it (or the model card's) applies again."""
    if not can(user.role, "admin"):
        raise HTTPException(403, "only admins recalibrate")
    key = _calibration_model(request, body.model)
    try:
        previous = rollback_calibration(db, key)
    except CalibrationError as exc:
        raise HTTPException(exc.status, exc.message) from None
    audit.record(db, "recalibrate", user, request, model=key, rolled_back=True, via="api")
    return {"active": calibration_dict(previous) if previous else None}


@router.get("/export.csv")
def export(request: Request, q: str = "", date_from: str = "", date_to: str = "", user: User = Depends(api_user),
           db: Session = Depends(get_db)):
    if not can(user.role, "export"):
        raise HTTPException(403, "not allowed to export")
    cases = db.scalars(filtered_cases(db, user, q, date_from, date_to)).all()
    audit.record(db, "export", user, request, cases=len(cases), q=q, date_from=date_from, date_to=date_to, via="api")
    return Response(export_csv(cases), media_type="text/csv")


@router.get("/audit.csv")
def audit_export(request: Request, action: str = "", email: str = "", date_from: str = "", date_to: str = "",
                 user: User = Depends(api_user), db: Session = Depends(get_db)):
    """The audit log as CSV (admins only), with the same filters as the Admin page."""
    if not can(user.role, "admin"):
        raise HTTPException(403, "only admins read the audit log")
    entries = db.scalars(audit_query(action, email, date_from, date_to)).all()
    audit.record(db, "audit_export", user, request, entries=len(entries), filter_action=action, filter_email=email, via="api")
    return Response(audit.audit_csv(entries), media_type="text/csv")


@router.get("/status")
async def status(request: Request, user: User = Depends(api_user)):
    """Models: the in-process one (with its batching), websocket model servers, and the
    broker's queue depth and model servers with their health."""
    return {"model_available": request.app.state.router.available, **(await request.app.state.router.full_status())}


@router.get("/stages")
def stages(user: User = Depends(api_user)):
    """Where this process's upload time went since it started: seconds and count per stage of the serving path
    (upload parsing is ``request`` less the rest). ``python -m benchmarks.bench_load`` reads it before and after a
    run. The in-process model's stages only: a model server elsewhere keeps its own."""
    if not can(user.role, "admin"):
        raise HTTPException(403, "only admins read the serving breakdown")
    return CLOCK.snapshot()
