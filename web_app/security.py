"""Passwords (Argon2id), API tokens, CSRF tokens and role checks."""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()

# What each role may do. Technicians upload and see their own cases; doctors see
# every case, the worklist and the export, review cases and see the site's performance;
# admins also manage users and servers (and may let technicians review: web_app.reviews).
PERMISSIONS = {
    "technician": {"upload"},
    "doctor": {"upload", "view_all", "worklist", "export", "review", "performance"},
    "admin": {"upload", "view_all", "worklist", "export", "review", "performance", "admin"},
}


def hash_password(password: str) -> str:
    return _hasher.hash(password)


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(16))


def verify_password(password: str, hashed: str | None) -> bool:
    """``hashed`` None (no such account) still costs one Argon2 verification, so that the answer's time does not
    tell which e-mail addresses have accounts."""
    if hashed is None:
        verify_password(password, _dummy_hash())
        return False
    try:
        return _hasher.verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


def can(role: str, permission: str) -> bool:
    return permission in PERMISSIONS.get(role, set())


def new_api_token() -> tuple[str, str]:
    """(token shown once to the user, hash stored in the database)."""
    token = "cxr_" + secrets.token_urlsafe(32)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_csrf_token() -> str:
    return secrets.token_urlsafe(24)


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))
