"""Signing in and out, the page language, and a user's API tokens."""

from __future__ import annotations

import datetime as dt

from fastapi import (
    APIRouter,
    Depends,
    Form,
    HTTPException,
    Request,
)
from fastapi.responses import RedirectResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import audit, sessions, throttle
from ..db import ApiToken, User, utcnow
from ..deps import check_csrf, csrf_token, get_db, lang_of, page_user
from ..i18n import LANGUAGES, translate
from ..security import can, new_api_token, verify_password
from ..templating import render

router = APIRouter(include_in_schema=False)


TOKEN_LIFETIMES_DAYS = (7, 30, 90, 365)
DEFAULT_TOKEN_DAYS = 90


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
