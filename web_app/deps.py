"""Request dependencies: database session, current user (page or API), CSRF, language."""

from __future__ import annotations

import datetime as dt

from fastapi import Depends, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload
from starlette.concurrency import run_in_threadpool

from . import audit, sessions
from .db import ApiToken, User, utcnow
from .i18n import LANGUAGES, negotiate, translate
from .security import can, hash_token, new_csrf_token, same

LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


class LoginRequired(Exception):
    """A page asked for by someone not signed in: the app answers with a redirect to the sign-in page."""


async def get_db(request: Request):
    # async: a plain generator would cost two hops through the thread pool per request (measured under load: the
    # event loop's wake-ups for them were 5 % of the web process); making a session does no I/O, and one that holds
    # no connection closes without any either
    db = request.app.state.SessionLocal()
    try:
        yield db
    finally:
        if db.in_transaction():
            await run_in_threadpool(db.close)  # a rollback on its connection: off the event loop
        else:
            db.close()


def lang_of(request: Request) -> str:
    lang = request.session.get("lang")
    return lang if lang in LANGUAGES else negotiate(request.headers.get("accept-language"))


def csrf_token(request: Request) -> str:
    tok = request.session.get("csrf")
    if not tok:
        tok = request.session["csrf"] = new_csrf_token()
    return tok


def page_user(request: Request, db: Session = Depends(get_db)) -> User:
    user = sessions.current_user(request.session, db)
    if user is None:
        raise LoginRequired()
    return user


def admin_page_user(user: User = Depends(page_user)) -> User:
    """A signed-in admin, for the admin pages (403 for anyone else)."""
    if not can(user.role, "admin"):
        raise HTTPException(403)
    return user


def api_user(request: Request, db: Session = Depends(get_db)) -> User:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        # the token and its user in one query: every API call reads both
        tok = db.scalar(select(ApiToken).options(joinedload(ApiToken.user))
                        .where(ApiToken.token_hash == hash_token(auth[7:].strip())))
        state = "unknown" if tok is None else ("inactive_user" if not tok.user.active else tok.state())
        if state == "active":
            now = utcnow()
            if tok.last_used is None or now - tok.last_used > LAST_USED_RESOLUTION:
                tok.last_used = now  # not on every call: a write per request would cost more than the request
                db.commit()
            return tok.user
        audit.record(db, "token_rejected", tok.user if tok else None, request, reason=state,
                     **({"token": tok.name, "token_id": tok.id} if tok else {}))
        message = {"expired": f"API token expired on {tok.expires_at:%Y-%m-%d}" if tok and tok.expires_at else "",
                   "revoked": "API token was revoked", "inactive_user": "the token's user is deactivated"}.get(state, "invalid API token")
        raise HTTPException(401, f"{message}; create a new one on the API tokens page" if tok else message,
                            headers={"WWW-Authenticate": "Bearer"})
    # a signed-in browser may call the API too, with the CSRF header for writes
    user = sessions.current_user(request.session, db)
    if user is not None:
        if request.method not in ("GET", "HEAD") and not same(request.headers.get("x-csrf-token"), request.session.get("csrf")):
            raise HTTPException(403, "missing or invalid X-CSRF-Token header")
        return user
    raise HTTPException(401, "authentication required: send Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"})


def require(permission: str):
    def check(user: User) -> User:
        if not can(user.role, permission):
            raise HTTPException(403, f"role {user.role} may not {permission}")
        return user

    return check


def check_csrf(request: Request, token: str | None) -> None:
    if not same(token, request.session.get("csrf")):
        raise HTTPException(403, translate("csrf", lang_of(request)))
