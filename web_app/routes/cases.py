"""Uploading films and the pages of a case: result, report, image and heatmap, history and its CSV."""

from __future__ import annotations

import datetime as dt

from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    HTTPException,
    Request,
    UploadFile,
)
from fastapi.responses import FileResponse, RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from .. import audit
from ..cases import (
    UploadError,
    analyse_upload,
    check_patient_codes,
    classify_case,
    expand_uploads,
    export_csv,
    heatmap_png,
    preview_path,
    read_upload,
    rotate_stored,
)
from ..db import Case, User
from ..deps import check_csrf, get_db, lang_of, page_user
from ..i18n import refusal_text, translate
from ..queries import filtered_cases, visible_case
from ..reviews import (
    may_review,
    next_unreviewed,
)
from ..security import can
from ..templating import render, render_case

router = APIRouter(include_in_schema=False)


@router.get("/")
def upload_form(request: Request, user: User = Depends(page_user)):
    return render(request, "upload.html", user)


@router.post("/upload")
async def upload(request: Request, files: list[UploadFile] = File(default=[]), patient_code: str = Form(""),
                 codes: list[str] = Form(default=[]), csrf_token_: str = Form("", alias="csrf_token"),
                 user: User = Depends(page_user), db: Session = Depends(get_db)):
    check_csrf(request, csrf_token_)
    settings = request.app.state.settings
    try:
        check_patient_codes(patient_code, *codes)
        uploads = [await read_upload(f, settings) for f in files if f.filename]
        items = await run_in_threadpool(expand_uploads, uploads, settings)  # unpacking never blocks other users
    except UploadError as exc:
        lang = lang_of(request)
        msg = translate("no_file", lang) if exc.code == "no_file" else refusal_text(exc.code, lang, exc.message) + f" ({exc.message})"
        return render(request, "upload.html", user, error=msg, status=exc.status)
    # one code per chosen file when the form sent them (not for ZIPs, whose files are unpacked here)
    per_file = codes if len(codes) == len(uploads) == len(items) else []
    ids = []
    for i, item in enumerate(items):
        code = (per_file[i].strip() or patient_code) if per_file else patient_code
        case = await analyse_upload(db, settings, request.app.state.router, user, item, code)
        ids.append(case.id)
    if len(ids) == 1:
        return RedirectResponse(f"/cases/{ids[0]}", status_code=303)
    return RedirectResponse("/batch?ids=" + ",".join(map(str, ids)), status_code=303)


@router.get("/batch")
def batch(request: Request, ids: str = "", user: User = Depends(page_user), db: Session = Depends(get_db)):
    cases = [visible_case(db, user, int(i)) for i in ids.split(",") if i.strip().isdigit()]
    # what needs attention first: flagged films by risk, then refusals (retakes), waiting, and the rest
    def attention(c: Case) -> int:
        if c.status == "done":
            return 0 if c.triage_flag else 1 if c.uncertain else 4
        return 2 if c.status == "refused" else 3

    cases.sort(key=lambda c: (attention(c), -(c.risk or 0.0), c.id))
    return render(request, "batch.html", user, cases=cases)


@router.get("/cases/{case_id}")
def case_page(case_id: int, request: Request, saved: int = 0, user: User = Depends(page_user), db: Session = Depends(get_db)):
    case = visible_case(db, user, case_id)
    audit.record(db, "case_view", user, request, case_id=case.id, page="case")
    reader = may_review(db, user) and can(user.role, "view_all")
    return render_case(request, user, db, case, review_saved=bool(saved) and bool(case.reviews),
                        next_case=next_unreviewed(db, after=case.id) if reader else None, reader=reader)


@router.post("/cases/{case_id}/rotate")
async def rotate(case_id: int, request: Request, turns: int = Form(1), csrf_token_: str = Form("", alias="csrf_token"),
                 user: User = Depends(page_user), db: Session = Depends(get_db)):
    """Turn the stored image 1-3 quarters clockwise and analyze it again (an X-ray uploaded on its side or
    upside down)."""
    check_csrf(request, csrf_token_)
    case = visible_case(db, user, case_id)
    settings = request.app.state.settings
    if not case.image_path:
        raise HTTPException(400, "this case has no stored image to rotate")
    if turns not in (1, 2, 3):
        raise HTTPException(400, "turns must be 1, 2 or 3 quarter turns clockwise")
    await run_in_threadpool(rotate_stored, settings, case, turns)
    await classify_case(db, settings, request.app.state.router, case, user)
    return RedirectResponse(f"/cases/{case.id}", status_code=303)


@router.post("/cases/{case_id}/retry")
async def retry(case_id: int, request: Request, csrf_token_: str = Form("", alias="csrf_token"),
                user: User = Depends(page_user), db: Session = Depends(get_db)):
    check_csrf(request, csrf_token_)
    case = visible_case(db, user, case_id)
    await classify_case(db, request.app.state.settings, request.app.state.router, case, user)
    return RedirectResponse(f"/cases/{case.id}", status_code=303)


@router.get("/cases/{case_id}/report")
def report(case_id: int, request: Request, user: User = Depends(page_user), db: Session = Depends(get_db)):
    case = visible_case(db, user, case_id)
    audit.record(db, "case_view", user, request, case_id=case.id, page="report")
    return render(request, "report.html", user, case=case, now=dt.datetime.utcnow(),
                  clinic=request.app.state.settings.clinic_name)


async def _png(request: Request, user: User, db: Session, case_id: int, make) -> FileResponse:
    """A case's picture (``make``: the film's preview or its heatmap, drawn off the event loop), or 404."""
    case = visible_case(db, user, case_id)
    path = await run_in_threadpool(make, request.app.state.settings, case)
    if path is None:
        raise HTTPException(404)
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, no-cache"})


@router.get("/cases/{case_id}/image.png")
async def case_image(case_id: int, request: Request, user: User = Depends(page_user), db: Session = Depends(get_db)):
    return await _png(request, user, db, case_id, preview_path)


@router.get("/cases/{case_id}/heatmap.png")
async def case_heatmap(case_id: int, request: Request, user: User = Depends(page_user), db: Session = Depends(get_db)):
    return await _png(request, user, db, case_id, heatmap_png)


@router.get("/cases")
def history(request: Request, q: str = "", date_from: str = "", date_to: str = "", user: User = Depends(page_user),
            db: Session = Depends(get_db)):
    cases = db.scalars(filtered_cases(db, user, q, date_from, date_to).limit(500)).all()
    return render(request, "cases.html", user, cases=cases, q=q, date_from=date_from, date_to=date_to)


@router.get("/export.csv")
def export(request: Request, q: str = "", date_from: str = "", date_to: str = "", user: User = Depends(page_user),
           db: Session = Depends(get_db)):
    if not can(user.role, "export"):
        raise HTTPException(403)
    cases = db.scalars(filtered_cases(db, user, q, date_from, date_to)).all()
    audit.record(db, "export", user, request, cases=len(cases), q=q, date_from=date_from, date_to=date_to)
    return Response(export_csv(cases), media_type="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="cases.csv"'})
