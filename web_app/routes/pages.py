"""HTML pages: sign in, upload, result, history, worklist, report, admin."""

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
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, object_session
from starlette.concurrency import run_in_threadpool

from uplink_server import NOTICE

from .. import audit, sessions, throttle
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
    visible_cases,
)
from ..db import ROLES, ApiToken, AuditLog, Case, User, utcnow
from ..deps import check_csrf, csrf_token, get_db, lang_of, page_user
from ..i18n import LANGUAGES, next_step, pct, refusal_text, translate
from ..recalibration import CalibrationError, current_threshold, readiness
from ..recalibration import apply as apply_calibration
from ..recalibration import preview as preview_calibration
from ..recalibration import rollback as rollback_calibration
from ..recalibration import versions as calibration_versions
from ..reviews import (
    READINGS,
    card_references,
    TECHNICIANS_REVIEW,
    ReviewError,
    add_review,
    compare_with_card,
    latest_reviews,
    may_review,
    may_see_performance,
    next_unreviewed,
    performance,
    set_site_flag,
    site_flag,
)
from ..security import can, hash_password, new_api_token, verify_password
from ..site_data import export_zip

router = APIRouter(include_in_schema=False)

TOKEN_LIFETIMES_DAYS = (7, 30, 90, 365)
DEFAULT_TOKEN_DAYS = 90


def render(request: Request, name: str, user: User | None = None, status: int = 200, **ctx) -> HTMLResponse:
    lang = lang_of(request)
    templates = request.app.state.templates
    # technicians may see Performance where the site allows it: the menu must say so, not only the URL
    db = object_session(user) if user is not None else None
    show_performance = user is not None and (can(user.role, "performance") or (db is not None and may_see_performance(db, user)))
    html = templates.get_template(name).render(show_performance=show_performance,
        request=request, user=user, lang=lang, t=lambda k: translate(k, lang), csrf=csrf_token(request),
        can=lambda p: user is not None and can(user.role, p), refusal_text=lambda c, m=None: refusal_text(c, lang, m),
        next_step=lambda c: next_step(c, lang), pct=pct, notice=translate("notice", lang), notice_en=NOTICE, **ctx)
    return HTMLResponse(html, status_code=status)


def _get_case(db: Session, user: User, case_id: int) -> Case:
    case = db.get(Case, case_id)
    if case is None or (case.created_by != user.id and not can(user.role, "view_all")):
        raise HTTPException(404)
    return case


@router.get("/login")
def login_form(request: Request, next: str = "/"):
    return render(request, "login.html", next=next)


@router.post("/login")
def login(request: Request, email: str = Form(...), password: str = Form(...), next: str = Form("/"),
          csrf_token_: str = Form("", alias="csrf_token"), db: Session = Depends(get_db)):
    check_csrf(request, csrf_token_)
    lang_ = lang_of(request)
    email = email.strip().lower()
    address = audit.client_address(request)
    user = db.scalar(select(User).where(User.email == email))
    wait = throttle.wait_seconds(db, email, address)
    if wait:
        audit.record(db, "login_throttled", user, request, wait_s=wait)
        resp = render(request, "login.html", next=next, error=translate("too_many_logins", lang_).format(seconds=wait), status=429)
        resp.headers["Retry-After"] = str(wait)
        return resp
    if not verify_password(password, user.password_hash if user else None) or not user.active:
        wait = throttle.record_failure(db, email, address)
        # the typed name is kept only when it is an account: people type passwords into the wrong field
        audit.record(db, "login_failed", user, request, **({} if user else {"account": "unknown"}))
        error = translate("bad_login", lang_) + (" " + translate("login_wait", lang_).format(seconds=wait) if wait else "")
        return render(request, "login.html", next=next, error=error, status=401)
    throttle.record_success(db, email)
    lang = request.session.get("lang")
    request.session.clear()  # new session on sign-in (no fixation)
    request.session.update({"user_id": user.id, "sid": sessions.start(db, user), "csrf": None, **({"lang": lang} if lang else {})})
    csrf_token(request)
    audit.record(db, "login", user, request)
    return RedirectResponse(next if next.startswith("/") and not next.startswith("//") else "/", status_code=303)


@router.post("/logout")
def logout(request: Request, csrf_token_: str = Form("", alias="csrf_token"), db: Session = Depends(get_db)):
    check_csrf(request, csrf_token_)
    uid = request.session.get("user_id")
    if uid and (u := db.get(User, uid)) is not None:
        audit.record(db, "logout", u, request)
    sessions.end(db, request.session.get("sid"))  # a copy of this cookie stops working too
    lang = request.session.get("lang")
    request.session.clear()
    if lang:
        request.session["lang"] = lang
    return RedirectResponse("/login", status_code=303)


@router.get("/lang/{code}")
def set_lang(code: str, request: Request, next: str = "/"):
    if code in LANGUAGES:
        request.session["lang"] = code
    return RedirectResponse(next if next.startswith("/") and not next.startswith("//") else "/", status_code=303)


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
    cases = [_get_case(db, user, int(i)) for i in ids.split(",") if i.strip().isdigit()]
    # what needs attention first: flagged films by risk, then refusals (retakes), waiting, and the rest
    def attention(c: Case) -> int:
        if c.status == "done":
            return 0 if c.triage_flag else 1 if c.uncertain else 4
        return 2 if c.status == "refused" else 3

    cases.sort(key=lambda c: (attention(c), -(c.risk or 0.0), c.id))
    return render(request, "batch.html", user, cases=cases)


def _render_case(request: Request, user: User, db: Session, case: Case, status: int = 200, **ctx) -> HTMLResponse:
    return render(request, "case.html", user, status=status, case=case, may_review=may_review(db, user),
                  readings=READINGS, **ctx)


@router.get("/cases/{case_id}")
def case_page(case_id: int, request: Request, saved: int = 0, user: User = Depends(page_user), db: Session = Depends(get_db)):
    case = _get_case(db, user, case_id)
    audit.record(db, "case_view", user, request, case_id=case.id, page="case")
    reader = may_review(db, user) and can(user.role, "view_all")
    return _render_case(request, user, db, case, review_saved=bool(saved) and bool(case.reviews),
                        next_case=next_unreviewed(db, after=case.id) if reader else None, reader=reader)


@router.post("/cases/{case_id}/review")
def review_page(case_id: int, request: Request, reading: str = Form(""), agrees: str = Form(""), note: str = Form(""),
                csrf_token_: str = Form("", alias="csrf_token"), user: User = Depends(page_user), db: Session = Depends(get_db)):
    """The doctor's reading; a bad one is shown on the case with the reason, and nothing is written."""
    check_csrf(request, csrf_token_)
    case = _get_case(db, user, case_id)
    try:
        review = add_review(db, case, user, reading, {"yes": True, "no": False}.get(agrees), note)
    except ReviewError as exc:
        return _render_case(request, user, db, case, status=exc.status,
                            review_error=translate(f"rv_{exc.code}", lang_of(request)))
    audit.record(db, "review", user, request, case_id=case.id, reading=review.reading, agrees=review.agrees)
    db.refresh(case)
    # back to the review, not the top of the page, with a confirmation there
    return RedirectResponse(f"/cases/{case.id}?saved=1#review", status_code=303)


@router.post("/cases/{case_id}/rotate")
async def rotate(case_id: int, request: Request, turns: int = Form(1), csrf_token_: str = Form("", alias="csrf_token"),
                 user: User = Depends(page_user), db: Session = Depends(get_db)):
    """Turn the stored image 1-3 quarters clockwise and analyze it again (an X-ray uploaded on its side or
    upside down)."""
    check_csrf(request, csrf_token_)
    case = _get_case(db, user, case_id)
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
    case = _get_case(db, user, case_id)
    await classify_case(db, request.app.state.settings, request.app.state.router, case, user)
    return RedirectResponse(f"/cases/{case.id}", status_code=303)


@router.get("/cases/{case_id}/report")
def report(case_id: int, request: Request, user: User = Depends(page_user), db: Session = Depends(get_db)):
    case = _get_case(db, user, case_id)
    audit.record(db, "case_view", user, request, case_id=case.id, page="report")
    return render(request, "report.html", user, case=case, now=dt.datetime.utcnow(),
                  clinic=request.app.state.settings.clinic_name)


@router.get("/cases/{case_id}/image.png")
async def case_image(case_id: int, request: Request, user: User = Depends(page_user), db: Session = Depends(get_db)):
    case = _get_case(db, user, case_id)
    p = await run_in_threadpool(preview_path, request.app.state.settings, case)
    if p is None:
        raise HTTPException(404)
    return FileResponse(p, media_type="image/png", headers={"Cache-Control": "private, no-cache"})


@router.get("/cases/{case_id}/heatmap.png")
async def case_heatmap(case_id: int, request: Request, user: User = Depends(page_user), db: Session = Depends(get_db)):
    case = _get_case(db, user, case_id)
    path = await run_in_threadpool(heatmap_png, request.app.state.settings, case)
    if path is None:
        raise HTTPException(404)
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, no-cache"})


def _filtered(db, user, q: str, date_from: str, date_to: str):
    query = visible_cases(db, user, can(user.role, "view_all"))
    if q:
        query = query.where(Case.patient_code.ilike(f"%{q.strip()}%"))
    try:
        return _in_days(query, Case.created_at, date_from, date_to)
    except ValueError:
        return query  # a half-typed date in the search box: no date filter


def _in_days(query, column, date_from: str, date_to: str):
    """Rows from the start of date_from to the end of date_to (YYYY-MM-DD, either may be empty)."""
    if date_from:
        query = query.where(column >= dt.datetime.fromisoformat(date_from))
    if date_to:
        query = query.where(column < dt.datetime.fromisoformat(date_to) + dt.timedelta(days=1))
    return query


@router.get("/cases")
def history(request: Request, q: str = "", date_from: str = "", date_to: str = "", user: User = Depends(page_user),
            db: Session = Depends(get_db)):
    cases = db.scalars(_filtered(db, user, q, date_from, date_to).limit(500)).all()
    return render(request, "cases.html", user, cases=cases, q=q, date_from=date_from, date_to=date_to)


WORKLIST_FILTERS = {
    "all": lambda c, rv: True,
    "unreviewed": lambda c, rv: c.status == "done" and rv is None,
    "disagreements": lambda c, rv: rv is not None and not rv.agrees,
    "refused": lambda c, rv: c.status == "refused",
}


@router.get("/worklist")
def worklist(request: Request, filter: str = "all", user: User = Depends(page_user), db: Session = Depends(get_db)):
    if not can(user.role, "worklist"):
        raise HTTPException(403)
    keep = WORKLIST_FILTERS.get(filter, WORKLIST_FILTERS["all"])
    # refused studies too, with their reason: each is a retake to arrange
    rows = db.scalars(select(Case).order_by(Case.risk.is_(None), Case.risk.desc(), Case.created_at.desc()).limit(1000)).all()
    latest = latest_reviews(db, [c.id for c in rows])
    counts = {name: sum(1 for c in rows if f(c, latest.get(c.id))) for name, f in WORKLIST_FILTERS.items()}
    # unread studies first, by risk (the query's order), then those already read
    rows = sorted((c for c in rows if keep(c, latest.get(c.id))), key=lambda c: c.id in latest)[:500]
    return render(request, "worklist.html", user, cases=rows, counts=counts,
                  active_filter=filter if filter in WORKLIST_FILTERS else "all")


def _performance(request: Request, user: User, db: Session, status: int = 200, **ctx) -> HTMLResponse:
    local = request.app.state.router.local
    perf = performance(db, card_references(local))
    lang = lang_of(request)
    from .. import plots  # matplotlib: only when a performance page is asked for, not at every start

    images = {v: plots.page_images(m, lambda k: translate(k, lang)) for v, m in perf["by_model"].items()}
    calibration = {}
    if can(user.role, "admin"):  # recalibration: per model version seen at this site
        calibration = {m: {"readiness": readiness(db, m), "versions": calibration_versions(db, m),
                           "threshold": current_threshold(db, m, local)} for m in perf["by_model"]}
    return render(request, "performance.html", user, status=status, perf=perf, calibration=calibration, images=images,
                  checks=compare_with_card(perf, getattr(local, "card", None)), **ctx)


@router.get("/performance")
def performance_page(request: Request, user: User = Depends(page_user), db: Session = Depends(get_db)):
    if not may_see_performance(db, user):
        raise HTTPException(403)
    audit.record(db, "performance_view", user, request)
    return _performance(request, user, db)


@router.get("/performance.{fmt}")
def performance_export(fmt: str, request: Request, user: User = Depends(page_user), db: Session = Depends(get_db)):
    """The performance page as CSV (numbers) or PDF (numbers, warnings and plots), in the page's language."""
    if not may_see_performance(db, user):
        raise HTTPException(403)
    if fmt not in ("csv", "pdf"):
        raise HTTPException(404)
    local = request.app.state.router.local
    perf = performance(db, card_references(local))
    audit.record(db, "export", user, request, kind=f"performance_{fmt}")
    from .. import plots

    if fmt == "csv":
        return Response(plots.performance_csv(perf), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="performance.csv"'})
    lang = lang_of(request)
    pdf = plots.performance_pdf(perf, compare_with_card(perf, getattr(local, "card", None)), lambda k: translate(k, lang),
                                request.app.state.settings.clinic_name)
    return Response(pdf, media_type="application/pdf", headers={"Content-Disposition": 'attachment; filename="performance.pdf"'})


@router.post("/performance/recalibrate")
def recalibrate_page(request: Request, model: str = Form(""), action: str = Form("preview"),
                     csrf_token_: str = Form("", alias="csrf_token"), user: User = Depends(page_user),
                     db: Session = Depends(get_db)):
    """Preview a site calibration, or apply it as a new version; a refusal says why and changes nothing."""
    check_csrf(request, csrf_token_)
    if not can(user.role, "admin"):
        raise HTTPException(403)
    threshold = current_threshold(db, model, request.app.state.router.local)
    try:
        if action != "apply":
            return _performance(request, user, db, preview=preview_calibration(db, model, threshold))
        cal = apply_calibration(db, model, user, threshold)
    except CalibrationError as exc:
        return _performance(request, user, db, status=exc.status, calibration_error=translate(f"cal_{exc.code}", lang_of(request)))
    audit.record(db, "recalibrate", user, request, model=model, version=cal.version)
    return RedirectResponse("/performance", status_code=303)


@router.post("/performance/rollback")
def rollback_page(request: Request, model: str = Form(""), csrf_token_: str = Form("", alias="csrf_token"),
                  user: User = Depends(page_user), db: Session = Depends(get_db)):
    check_csrf(request, csrf_token_)
    if not can(user.role, "admin"):
        raise HTTPException(403)
    try:
        rollback_calibration(db, model)
    except CalibrationError as exc:
        return _performance(request, user, db, status=exc.status, calibration_error=translate(f"cal_{exc.code}", lang_of(request)))
    audit.record(db, "recalibrate", user, request, model=model, rolled_back=True)
    return RedirectResponse("/performance", status_code=303)


def site_export_response(request: Request, user: User, db: Session, **audit_detail) -> Response:
    """The reviewed cases as training data (web_app.site_data), for the page and the API."""
    if not can(user.role, "export"):
        raise HTTPException(403, "not allowed to export")
    data, n = export_zip(db, request.app.state.settings)
    audit.record(db, "export", user, request, kind="site_data", cases=n, **audit_detail)
    return Response(data, media_type="application/zip", headers={"Content-Disposition": 'attachment; filename="site-data.zip"'})


@router.get("/site-export.zip")
def site_export(request: Request, user: User = Depends(page_user), db: Session = Depends(get_db)):
    return site_export_response(request, user, db)


@router.get("/export.csv")
def export(request: Request, q: str = "", date_from: str = "", date_to: str = "", user: User = Depends(page_user),
           db: Session = Depends(get_db)):
    if not can(user.role, "export"):
        raise HTTPException(403)
    cases = db.scalars(_filtered(db, user, q, date_from, date_to)).all()
    audit.record(db, "export", user, request, cases=len(cases), q=q, date_from=date_from, date_to=date_to)
    return Response(export_csv(cases), media_type="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="cases.csv"'})


def _my_tokens(db: Session, user: User):
    return db.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.created_at.desc())).all()


@router.get("/tokens")
def tokens(request: Request, user: User = Depends(page_user), db: Session = Depends(get_db)):
    return render(request, "tokens.html", user, tokens=_my_tokens(db, user), lifetimes=TOKEN_LIFETIMES_DAYS,
                  default_days=DEFAULT_TOKEN_DAYS, now=utcnow())


@router.post("/tokens")
def new_token(request: Request, name: str = Form("script"), days: int = Form(DEFAULT_TOKEN_DAYS),
              csrf_token_: str = Form("", alias="csrf_token"), user: User = Depends(page_user), db: Session = Depends(get_db)):
    check_csrf(request, csrf_token_)
    if days not in TOKEN_LIFETIMES_DAYS:
        raise HTTPException(400, f"a token lives {', '.join(map(str, TOKEN_LIFETIMES_DAYS))} days")
    token, h = new_api_token()
    tok = ApiToken(user_id=user.id, name=name.strip()[:100] or "script", token_hash=h,
                   expires_at=utcnow() + dt.timedelta(days=days))
    db.add(tok)
    db.flush()
    audit.record(db, "token_created", user, request, token=tok.name, token_id=tok.id, days=days)
    return render(request, "tokens.html", user, tokens=_my_tokens(db, user), new_token=token, lifetimes=TOKEN_LIFETIMES_DAYS,
                  default_days=DEFAULT_TOKEN_DAYS, now=utcnow())


@router.post("/tokens/{token_id}/revoke")
def revoke_token(token_id: int, request: Request, csrf_token_: str = Form("", alias="csrf_token"),
                 user: User = Depends(page_user), db: Session = Depends(get_db)):
    check_csrf(request, csrf_token_)
    tok = db.get(ApiToken, token_id)
    if tok is None or (tok.user_id != user.id and not can(user.role, "admin")):
        raise HTTPException(404)
    if tok.revoked_at is None:
        tok.revoked_at = utcnow()
        audit.record(db, "token_revoked", user, request, token=tok.name, token_id=tok.id, owner=tok.user.email)
    return RedirectResponse("/tokens", status_code=303)


@router.post("/admin/site")
def admin_site(request: Request, technicians_review: str = Form(""), csrf_token_: str = Form("", alias="csrf_token"),
               user: User = Depends(page_user), db: Session = Depends(get_db)):
    """Site switches: whether technicians may review cases and see the site's performance."""
    check_csrf(request, csrf_token_)
    if not can(user.role, "admin"):
        raise HTTPException(403)
    set_site_flag(db, TECHNICIANS_REVIEW, technicians_review == "1")
    audit.record(db, "site_setting", user, request, technicians_review=technicians_review == "1")
    return RedirectResponse("/admin?saved=1", status_code=303)


@router.get("/admin")
async def admin(request: Request, added: str = "", updated: str = "", ended: str = "", saved: int = 0,
                user: User = Depends(page_user), db: Session = Depends(get_db)):
    if not can(user.role, "admin"):
        raise HTTPException(403)
    lang = lang_of(request)
    message = ""
    if added and (u := db.scalar(select(User).where(User.email == added))):
        message = translate("user_added", lang).format(email=u.email, role=translate("role_" + u.role, lang))
    elif updated:
        message = translate("user_updated", lang).format(email=updated)
        if ended.count(",") == 1 and ended.replace(",", "").isdigit():
            n_sessions, n_tokens = ended.split(",")
            message += " " + translate("sessions_ended", lang).format(sessions=n_sessions, tokens=n_tokens)
    elif saved:
        message = translate("settings_saved", lang)
    return render(request, "admin.html", user, users=db.scalars(select(User).order_by(User.id)).all(),
                  roles=tuple(reversed(ROLES)), message=message, technicians_review=site_flag(db, TECHNICIANS_REVIEW),
                  servers=await request.app.state.router.full_status(), uplink_key=request.app.state.settings.uplink_key,
                  dicom=request.app.state.dicom_node.status() if request.app.state.dicom_node else None,
                  base_url=str(request.base_url).rstrip("/"))


@router.post("/admin/users")
def add_user(request: Request, email: str = Form(...), name: str = Form(""), password: str = Form(...),
             role: str = Form("technician"), csrf_token_: str = Form("", alias="csrf_token"),
             user: User = Depends(page_user), db: Session = Depends(get_db)):
    check_csrf(request, csrf_token_)
    if not can(user.role, "admin"):
        raise HTTPException(403)
    email = email.strip().lower()
    if role not in ROLES or len(password) < 8 or db.scalar(select(User).where(User.email == email)):
        raise HTTPException(400, "invalid user: unknown role, password under 8 characters, or email taken")
    db.add(User(email=email, name=name, password_hash=hash_password(password), role=role))
    audit.record(db, "user_added", user, request, email=email, role=role)
    return RedirectResponse(f"/admin?added={email}", status_code=303)


def _managed_user(db: Session, admin_user: User, user_id: int) -> User:
    if not can(admin_user.role, "admin"):
        raise HTTPException(403)
    target = db.get(User, user_id)
    if target is None:
        raise HTTPException(404)
    return target


@router.post("/admin/users/{user_id}/active")
def set_active(user_id: int, request: Request, active: int = Form(...), csrf_token_: str = Form("", alias="csrf_token"),
               user: User = Depends(page_user), db: Session = Depends(get_db)):
    check_csrf(request, csrf_token_)
    target = _managed_user(db, user, user_id)
    if target.id == user.id:
        raise HTTPException(400, "you cannot deactivate yourself")
    target.active = bool(active)  # a deactivated user's session and API tokens stop working at once
    audit.record(db, "user_updated", user, request, email=target.email, active=target.active)
    return RedirectResponse(f"/admin?updated={target.email}", status_code=303)


@router.post("/admin/users/{user_id}/password")
def set_password(user_id: int, request: Request, password: str = Form(...), csrf_token_: str = Form("", alias="csrf_token"),
                 user: User = Depends(page_user), db: Session = Depends(get_db)):
    check_csrf(request, csrf_token_)
    target = _managed_user(db, user, user_id)
    if len(password) < 8:
        raise HTTPException(400, "the password needs at least 8 characters")
    target.password_hash = hash_password(password)
    db.commit()
    # whoever knew the old password may hold a session or a token: all of them end (the admin's own included,
    # when resetting their own password, except this browser's)
    ended = sessions.end_all(db, target.id)
    if target.id == user.id:
        request.session["sid"] = sessions.start(db, user)
    audit.record(db, "user_updated", user, request, email=target.email, password="reset", **{f"ended_{k}": v for k, v in ended.items()})
    return RedirectResponse(f"/admin?updated={target.email}&ended={ended['sessions']},{ended['tokens']}", status_code=303)


def _audit_query(action: str, email: str, date_from: str, date_to: str):
    q = select(AuditLog).order_by(AuditLog.at.desc(), AuditLog.id.desc())
    if action:
        q = q.where(AuditLog.action == action)
    if email:
        q = q.join(User, AuditLog.user_id == User.id).where(User.email.ilike(f"%{email.strip()}%"))
    try:
        return _in_days(q, AuditLog.at, date_from, date_to)
    except ValueError:
        raise HTTPException(400, "dates are YYYY-MM-DD") from None


@router.get("/admin/audit")
def audit_page(request: Request, action: str = "", email: str = "", date_from: str = "", date_to: str = "",
               user: User = Depends(page_user), db: Session = Depends(get_db)):
    if not can(user.role, "admin"):
        raise HTTPException(403)
    entries = db.scalars(_audit_query(action, email, date_from, date_to).limit(500)).all()
    return render(request, "audit.html", user, entries=entries, actions=audit.ACTIONS, action=action, email=email,
                  date_from=date_from, date_to=date_to)


@router.get("/admin/audit.csv")
def audit_export(request: Request, action: str = "", email: str = "", date_from: str = "", date_to: str = "",
                 user: User = Depends(page_user), db: Session = Depends(get_db)):
    if not can(user.role, "admin"):
        raise HTTPException(403)
    entries = db.scalars(_audit_query(action, email, date_from, date_to)).all()
    audit.record(db, "audit_export", user, request, entries=len(entries), filter_action=action, filter_email=email)
    return Response(audit.audit_csv(entries), media_type="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="audit.csv"'})
