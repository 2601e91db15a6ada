"""The audit log: who signed in, used a token, viewed, exported or changed what."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy.orm import Session

from .db import AuditLog, User
from .spreadsheet import to_csv

# What is recorded, with the words the audit page shows
ACTIONS = ("login", "login_failed", "login_throttled", "logout", "token_created", "token_revoked", "token_rejected",
           "upload", "classify", "case_view", "export", "audit_export", "user_added", "user_updated", "review",
           "performance_view", "site_setting", "recalibrate")


def client_address(request: Request | None) -> str | None:
    return request.client.host if request is not None and request.client else None


def record(db: Session, action: str, user: User | None = None, request: Request | None = None,
           case_id: int | None = None, commit: bool = True, **detail) -> AuditLog:
    entry = AuditLog(action=action, user_id=user.id if user else None, case_id=case_id,
                     detail=detail or None, address=client_address(request))
    db.add(entry)
    if commit:
        db.commit()
    return entry


AUDIT_FIELDS = ["id", "at", "action", "user", "address", "case_id", "detail"]


def audit_csv(entries) -> str:
    return to_csv(AUDIT_FIELDS, ([e.id, e.at.isoformat() + "Z", e.action, e.user.email if e.user else "", e.address or "",
                                  e.case_id or "", "" if not e.detail else "; ".join(f"{k}={v}" for k, v in e.detail.items())]
                                 for e in entries))
