"""What doctors do with the results: readings, the worklist, the site's performance and its recalibration."""

from __future__ import annotations

from fastapi import (
    APIRouter,
    Depends,
    Form,
    HTTPException,
    Request,
)
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import audit
from ..db import Case, User
from ..deps import admin_page_user, check_csrf, get_db, lang_of, page_user
from ..i18n import translate
from ..queries import visible_case
from ..recalibration import CalibrationError, current_threshold, readiness
from ..recalibration import apply as apply_calibration
from ..recalibration import preview as preview_calibration
from ..recalibration import rollback as rollback_calibration
from ..recalibration import versions as calibration_versions
from ..reviews import (
    ReviewError,
    add_review,
    card_references,
    compare_with_card,
    latest_reviews,
    may_see_performance,
    performance,
)
from ..security import can
from ..templating import render, render_case

router = APIRouter(include_in_schema=False)


@router.post("/cases/{case_id}/review")
def review_page(case_id: int, request: Request, reading: str = Form(""), agrees: str = Form(""), note: str = Form(""),
                csrf_token_: str = Form("", alias="csrf_token"), user: User = Depends(page_user), db: Session = Depends(get_db)):
    """The doctor's reading; a bad one is shown on the case with the reason, and nothing is written."""
    check_csrf(request, csrf_token_)
    case = visible_case(db, user, case_id)
    try:
        review = add_review(db, case, user, reading, {"yes": True, "no": False}.get(agrees), note)
    except ReviewError as exc:
        return render_case(request, user, db, case, status=exc.status,
                            review_error=translate(f"rv_{exc.code}", lang_of(request)))
    audit.record(db, "review", user, request, case_id=case.id, reading=review.reading, agrees=review.agrees)
    db.refresh(case)
    # back to the review, not the top of the page, with a confirmation there
    return RedirectResponse(f"/cases/{case.id}?saved=1#review", status_code=303)


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
                     csrf_token_: str = Form("", alias="csrf_token"), user: User = Depends(admin_page_user),
                     db: Session = Depends(get_db)):
    """Preview a site calibration, or apply it as a new version; a refusal says why and changes nothing."""
    check_csrf(request, csrf_token_)
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
                  user: User = Depends(admin_page_user), db: Session = Depends(get_db)):
    check_csrf(request, csrf_token_)
    try:
        rollback_calibration(db, model)
    except CalibrationError as exc:
        return _performance(request, user, db, status=exc.status, calibration_error=translate(f"cal_{exc.code}", lang_of(request)))
    audit.record(db, "recalibrate", user, request, model=model, rolled_back=True)
    return RedirectResponse("/performance", status_code=303)
