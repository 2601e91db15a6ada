"""Sign-in throttling: growing delays per account and per client address.

Kept in the database (not in process memory) so that every web node behind a
load balancer sees the same counts. A few failures are free (typos); after
that each failure doubles the wait, up to a cap, and a quiet day forgets them.
While a wait runs even the right password is refused, or guessing would
continue between waits.
"""

from __future__ import annotations

import datetime as dt
import math

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import SignInFailures, utcnow

FREE_FAILURES = {"account": 3, "address": 10}
MAX_DELAY_S = 15 * 60
FORGET_AFTER = dt.timedelta(hours=24)


def delay_after(failures: int, scope: str) -> int:
    """Seconds to wait after this many consecutive failures (2, 4, 8, ... capped)."""
    extra = failures - FREE_FAILURES[scope]
    return 0 if extra <= 0 else int(min(2 ** extra, MAX_DELAY_S))


def _keys(email: str, address: str | None) -> list[tuple[str, str]]:
    keys = [("account", (email or "").strip().lower()[:255])]
    if address:
        keys.append(("address", address[:255]))
    return keys


def _row(db: Session, scope: str, key: str) -> SignInFailures | None:
    return db.scalar(select(SignInFailures).where(SignInFailures.scope == scope, SignInFailures.key == key))


def wait_seconds(db: Session, email: str, address: str | None, now: dt.datetime | None = None) -> int:
    """How long sign-in stays refused for this account or address (0: go ahead)."""
    now = now or utcnow()
    wait = 0.0
    for scope, key in _keys(email, address):
        row = _row(db, scope, key)
        if row is not None and row.blocked_until is not None and row.blocked_until > now:
            wait = max(wait, (row.blocked_until - now).total_seconds())
    return math.ceil(wait)


def record_failure(db: Session, email: str, address: str | None, now: dt.datetime | None = None) -> int:
    """Count a failed sign-in; returns the wait it starts (0 while failures are free)."""
    now = now or utcnow()
    wait = 0
    for scope, key in _keys(email, address):
        row = _row(db, scope, key)
        if row is None:
            row = SignInFailures(scope=scope, key=key, failures=0, last_failure=now)
            db.add(row)
            try:
                db.flush()
            except IntegrityError:  # another node inserted it first
                db.rollback()
                row = _row(db, scope, key)
        if now - row.last_failure > FORGET_AFTER:
            row.failures = 0
        row.failures += 1
        row.last_failure = now
        d = delay_after(row.failures, scope)
        row.blocked_until = now + dt.timedelta(seconds=d) if d else None
        wait = max(wait, d)
        db.commit()  # per scope: a lost insert race on one must not undo the other's count
    return wait


def record_success(db: Session, email: str) -> None:
    """A right password clears the account's count (not the address's: one
    good account must not launder guesses at others from the same place)."""
    row = _row(db, "account", (email or "").strip().lower()[:255])
    if row is not None:
        db.delete(row)
        db.commit()
