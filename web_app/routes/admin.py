"""Running the site: users, site switches, the uplink and DICOM status, the audit log, the training-data export."""

from __future__ import annotations

from fastapi import (
    APIRouter,
    Depends,
    Form,
    HTTPException,
    Request,
)
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import audit, sessions
from ..db import ROLES, User
from ..deps import admin_page_user, check_csrf, get_db, lang_of, page_user
from ..i18n import translate
from ..queries import audit_query
from ..reviews import (
    TECHNICIANS_REVIEW,
    set_site_flag,
    site_flag,
)
from ..security import hash_password
from ..site_data import export_response
from ..templating import render

router = APIRouter(include_in_schema=False)


@router.post("/admin/site")
def admin_site(request: Request, technicians_review: str = Form(""), csrf_token_: str = Form("", alias="csrf_token"),
               user: User = Depends(admin_page_user), db: Session = Depends(get_db)):
    """Site switches: whether technicians may review cases and see the site's performance."""
    check_csrf(request, csrf_token_)
    set_site_flag(db, TECHNICIANS_REVIEW, technicians_review == "1")
    audit.record(db, "site_setting", user, request, technicians_review=technicians_review == "1")
    return RedirectResponse("/admin?saved=1", status_code=303)


@router.get("/admin")
async def admin(request: Request, added: str = "", updated: str = "", ended: str = "", saved: int = 0,
                user: User = Depends(admin_page_user), db: Session = Depends(get_db)):
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
             user: User = Depends(admin_page_user), db: Session = Depends(get_db)):
    check_csrf(request, csrf_token_)
    email = email.strip().lower()
    if role not in ROLES or len(password) < 8 or db.scalar(select(User).where(User.email == email)):
        raise HTTPException(400, "invalid user: unknown role, password under 8 characters, or email taken")
    db.add(User(email=email, name=name, password_hash=hash_password(password), role=role))
    audit.record(db, "user_added", user, request, email=email, role=role)
    return RedirectResponse(f"/admin?added={email}", status_code=303)


def _managed_user(db: Session, user_id: int) -> User:
    target = db.get(User, user_id)
    if target is None:
        raise HTTPException(404)
    return target


@router.post("/admin/users/{user_id}/active")
def set_active(user_id: int, request: Request, active: int = Form(...), csrf_token_: str = Form("", alias="csrf_token"),
               user: User = Depends(admin_page_user), db: Session = Depends(get_db)):
    check_csrf(request, csrf_token_)
    target = _managed_user(db, user_id)
    if target.id == user.id:
        raise HTTPException(400, "you cannot deactivate yourself")
    target.active = bool(active)  # a deactivated user's session and API tokens stop working at once
    audit.record(db, "user_updated", user, request, email=target.email, active=target.active)
    return RedirectResponse(f"/admin?updated={target.email}", status_code=303)


@router.post("/admin/users/{user_id}/password")
def set_password(user_id: int, request: Request, password: str = Form(...), csrf_token_: str = Form("", alias="csrf_token"),
                 user: User = Depends(admin_page_user), db: Session = Depends(get_db)):
    check_csrf(request, csrf_token_)
    target = _managed_user(db, user_id)
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


@router.get("/admin/audit")
def audit_page(request: Request, action: str = "", email: str = "", date_from: str = "", date_to: str = "",
               user: User = Depends(admin_page_user), db: Session = Depends(get_db)):
    entries = db.scalars(audit_query(action, email, date_from, date_to).limit(500)).all()
    return render(request, "audit.html", user, entries=entries, actions=audit.ACTIONS, action=action, email=email,
                  date_from=date_from, date_to=date_to)


@router.get("/admin/audit.csv")
def audit_export(request: Request, action: str = "", email: str = "", date_from: str = "", date_to: str = "",
                 user: User = Depends(admin_page_user), db: Session = Depends(get_db)):
    entries = db.scalars(audit_query(action, email, date_from, date_to)).all()
    audit.record(db, "audit_export", user, request, entries=len(entries), filter_action=action, filter_email=email)
    return Response(audit.audit_csv(entries), media_type="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="audit.csv"'})


@router.get("/site-export.zip")
def site_export(request: Request, user: User = Depends(page_user), db: Session = Depends(get_db)):
    return export_response(request, user, db)
