"""Server-side sign-in sessions.

The signed cookie alone cannot be taken back: a copy of it would keep working for its 12 hours after the user
signed out. Each sign-in is a row of ``user_sessions`` named in the cookie; signing out revokes that row, and a
password reset revokes every row and API token of the user. A request counts as signed in only while its row is
live and its user active.
"""

from __future__ import annotations

import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .db import ApiToken, User, UserSession, utcnow


def start(db: Session, user: User) -> str:
    sid = secrets.token_urlsafe(32)
    db.add(UserSession(id=sid, user_id=user.id))
    db.commit()
    return sid


def current_user(session: dict, db: Session) -> User | None:
    """The signed-in, active user of a request's cookie session; None when signed out, revoked or deactivated."""
    sid, uid = session.get("sid"), session.get("user_id")
    if not sid or not uid:
        return None
    row = db.get(UserSession, sid)
    if row is None or row.revoked_at is not None or row.user_id != uid:
        return None
    user = db.get(User, uid)
    return user if user is not None and user.active else None


def end(db: Session, sid: str | None) -> None:
    if sid:
        db.execute(update(UserSession).where(UserSession.id == sid, UserSession.revoked_at.is_(None)).values(revoked_at=utcnow()))
        db.commit()


def end_all(db: Session, user_id: int) -> dict:
    """Revoke every session and API token of a user (a password reset): {sessions, tokens} ended."""
    now = utcnow()
    n_s = db.execute(update(UserSession).where(UserSession.user_id == user_id, UserSession.revoked_at.is_(None))
                     .values(revoked_at=now)).rowcount
    tokens = db.scalars(select(ApiToken).where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))).all()
    for t in tokens:
        t.revoked_at = now
    db.commit()
    return {"sessions": n_s, "tokens": len(tokens)}
