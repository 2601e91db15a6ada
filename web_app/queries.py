"""The case and audit queries that both the pages and the API use: who may see which case, search, date ranges."""

from __future__ import annotations

import datetime as dt

from fastapi import HTTPException
from sqlalchemy import select
from sqlalchemy.orm import Session

from .db import AuditLog, Case, User
from .security import can


def visible_cases(db: Session, user: User, can_view_all: bool):
    q = select(Case).order_by(Case.created_at.desc(), Case.id.desc())
    if not can_view_all:
        q = q.where(Case.created_by == user.id)
    return q


def visible_case(db: Session, user: User, case_id: int) -> Case:
    """The case, or 404 when it does not exist or is someone else's and the user may not see all cases."""
    case = db.get(Case, case_id)
    if case is None or (case.created_by != user.id and not can(user.role, "view_all")):
        raise HTTPException(404)
    return case


def in_days(query, column, date_from: str, date_to: str):
    """Rows from the start of date_from to the end of date_to (YYYY-MM-DD, either may be empty)."""
    if date_from:
        query = query.where(column >= dt.datetime.fromisoformat(date_from))
    if date_to:
        query = query.where(column < dt.datetime.fromisoformat(date_to) + dt.timedelta(days=1))
    return query


def filtered_cases(db: Session, user: User, q: str, date_from: str, date_to: str):
    """The history search: the user's visible cases by patient code and upload date."""
    query = visible_cases(db, user, can(user.role, "view_all"))
    if q:
        query = query.where(Case.patient_code.ilike(f"%{q.strip()}%"))
    try:
        return in_days(query, Case.created_at, date_from, date_to)
    except ValueError:
        return query  # a half-typed date in the search box: no date filter


def audit_query(action: str, email: str, date_from: str, date_to: str):
    q = select(AuditLog).order_by(AuditLog.at.desc(), AuditLog.id.desc())
    if action:
        q = q.where(AuditLog.action == action)
    if email:
        q = q.join(User, AuditLog.user_id == User.id).where(User.email.ilike(f"%{email.strip()}%"))
    try:
        return in_days(q, AuditLog.at, date_from, date_to)
    except ValueError:
        raise HTTPException(400, "dates are YYYY-MM-DD") from None
