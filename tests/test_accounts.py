"""Accounts: sign-in throttling, API token expiry and revocation, the audit log."""

from __future__ import annotations

import csv
import datetime as dt
import io
import time

import httpx
import pytest

from .webapp_helpers import ADMIN, add_user, csrf_of, live_app, new_token, sign_in


@pytest.fixture()
def app_local(tmp_path, classifier):
    with live_app(tmp_path / "data", classifier=classifier) as (app, base):
        yield app, base


def _try(base: str, email: str, password: str, client: httpx.Client | None = None) -> httpx.Response:
    c = client or httpx.Client(base_url=base, follow_redirects=True)
    return c.post("/login", data={"email": email, "password": password, "csrf_token": csrf_of(c.get("/login").text)})


def test_delays_grow_and_are_kept_per_account_and_address(tmp_path):
    from web_app import throttle
    from web_app.db import make_engine, migrate, session_factory

    url = f"sqlite:///{tmp_path / 't.db'}"
    migrate(url)
    db = session_factory(make_engine(url))()
    t0 = dt.datetime(2026, 12, 1, 12, 0, 0)
    waits = [throttle.record_failure(db, "doc@clinic.ec", "10.0.0.1", t0 + dt.timedelta(hours=i)) for i in range(8)]
    assert waits == [0, 0, 0, 2, 4, 8, 16, 32]  # three typos are free, then the wait doubles
    t = t0 + dt.timedelta(hours=7)
    assert throttle.wait_seconds(db, "doc@clinic.ec", "10.0.0.2", t) == 32  # the account, from anywhere
    assert throttle.wait_seconds(db, "doc@clinic.ec", None, t + dt.timedelta(seconds=33)) == 0
    assert throttle.delay_after(100, "account") == throttle.MAX_DELAY_S
    # a day later the failures are forgotten
    assert throttle.record_failure(db, "doc@clinic.ec", None, t + dt.timedelta(hours=25)) == 0
    # one address guessing at many accounts is slowed down too
    waits = [throttle.record_failure(db, f"user{i}@clinic.ec", "10.9.9.9", t0) for i in range(12)]
    assert waits[:10] == [0] * 10 and waits[10:] == [2, 4]
    assert throttle.wait_seconds(db, "someone-else@clinic.ec", "10.9.9.9", t0) == 4
    # a right password clears the account, not the address
    throttle.record_success(db, "user3@clinic.ec")
    assert throttle.wait_seconds(db, "user3@clinic.ec", "10.9.9.9", t0) == 4
    db.close()


def test_sign_in_throttled_with_a_clear_message_and_audited(app_local):
    app, base = app_local
    for _ in range(3):
        r = _try(base, ADMIN[0], "wrong-password")
        assert r.status_code == 401 and "Wrong email or password." in r.text and "Wait" not in r.text
    r = _try(base, ADMIN[0], "wrong-password")
    assert r.status_code == 401 and "Wait 2 s before the next try" in r.text
    r = _try(base, ADMIN[0], ADMIN[1])  # even the right password waits
    assert r.status_code == 429 and int(r.headers["retry-after"]) in (1, 2)
    assert "Too many failed sign-ins" in r.text
    es = httpx.Client(base_url=base, follow_redirects=True, headers={"Accept-Language": "es"})
    assert "Demasiados intentos fallidos" in _try(base, ADMIN[0], ADMIN[1], es).text
    time.sleep(2.2)
    c, csrf = sign_in(base)  # after the wait, the right password works and clears the count
    assert _try(base, ADMIN[0], "wrong-password").status_code == 401
    assert _try(base, "nobody@clinic.ec", "x").status_code == 401
    page = c.get("/admin/audit").text
    for action in ("failed sign-in", "sign-in refused (too many failures)", "sign-in"):
        assert action in page
    from web_app.db import AuditLog

    with app.state.SessionLocal() as db:
        failed = db.query(AuditLog).filter(AuditLog.action == "login_failed").all()
        assert len(failed) == 6 and all(e.address == "127.0.0.1" for e in failed)
        assert {(e.detail or {}).get("account") for e in failed} == {None, "unknown"}


def test_tokens_expire_are_revoked_and_record_last_use(app_local, one_xray):
    app, base = app_local
    c, csrf = sign_in(base)
    page = c.get("/tokens").text
    assert '<option value="90" selected>' in page  # 90 days unless chosen
    r = c.post("/tokens", data={"csrf_token": csrf, "name": "pacs-bridge", "days": "7"})
    short = r.text.split('data-testid="new-token">')[1].split("<")[0]
    long_ = new_token(c, csrf)
    assert c.post("/tokens", data={"csrf_token": csrf, "name": "x", "days": "100000"}).status_code == 400
    from web_app.db import ApiToken, utcnow

    with app.state.SessionLocal() as db:
        toks = {t.name: t for t in db.query(ApiToken).all()}
        assert abs((toks["test"].expires_at - utcnow()).days - 90) <= 1
        assert abs((toks["pacs-bridge"].expires_at - utcnow()).days - 7) <= 1
        assert toks["test"].last_used is None
        ids = {k: t.id for k, t in toks.items()}
    api = httpx.Client(base_url=base, timeout=60)
    h = {"Authorization": f"Bearer {long_}"}
    assert api.get("/api/v1/cases", headers=h).status_code == 200
    with app.state.SessionLocal() as db:
        assert db.get(ApiToken, ids["test"]).last_used is not None
        db.get(ApiToken, ids["pacs-bridge"]).expires_at = utcnow() - dt.timedelta(minutes=1)
        db.commit()
    r = api.get("/api/v1/cases", headers={"Authorization": f"Bearer {short}"})
    assert r.status_code == 401 and "expired on" in r.json()["detail"] and "API tokens page" in r.json()["detail"]
    page = c.get("/tokens").text
    assert "expired" in page and "Last used" in page
    r = c.post(f"/tokens/{ids['test']}/revoke", data={"csrf_token": csrf})
    assert r.status_code == 200 and "revoked" in r.text
    r = api.get("/api/v1/cases", headers=h)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert api.get("/api/v1/cases", headers={"Authorization": "Bearer cxr_made_up"}).status_code == 401
    # someone else's token cannot be revoked by a non-admin
    add_user(c, csrf, "tech@clinic.ec", "technician")
    tech, tcsrf = sign_in(base, "tech@clinic.ec", "user-pass-123")
    tech_tok = new_token(tech, tcsrf)
    assert tech.post(f"/tokens/{ids['pacs-bridge']}/revoke", data={"csrf_token": tcsrf}).status_code == 404
    assert api.get("/api/v1/cases", headers={"Authorization": f"Bearer {tech_tok}"}).status_code == 200
    reasons = [line for line in c.get("/admin/audit.csv", params={"action": "token_rejected"}).text.splitlines()[1:]]
    assert len(reasons) == 3 and {r.split("reason=")[1].split(";")[0] for r in reasons} == {"expired", "revoked", "unknown"}


def test_audit_log_records_views_and_exports_for_admins_only(app_local, one_xray):
    app, base = app_local
    c, csrf = sign_in(base)
    add_user(c, csrf, "doc@clinic.ec", "doctor")
    doc, dcsrf = sign_in(base, "doc@clinic.ec", "user-pass-123")
    r = doc.post("/upload", data={"csrf_token": dcsrf, "patient_code": "EC-9"},
                 files=[("files", ("x.jpeg", one_xray.read_bytes(), "image/jpeg"))])
    case_id = int(str(r.url).rsplit("/", 1)[1])  # the redirect shows the case: one view
    doc.get(f"/cases/{case_id}/report")
    doc.get("/export.csv")
    tok = new_token(doc, dcsrf)
    httpx.get(f"{base}/api/v1/cases/{case_id}", headers={"Authorization": f"Bearer {tok}"})
    assert doc.get("/admin/audit").status_code == 403 and doc.get("/admin/audit.csv").status_code == 403
    assert httpx.get(f"{base}/api/v1/audit.csv", headers={"Authorization": f"Bearer {tok}"}).status_code == 403
    rows = list(csv.DictReader(io.StringIO(c.get("/admin/audit.csv", params={"email": "doc@"}).text)))
    by_action = {}
    for row in rows:
        assert row["user"] == "doc@clinic.ec"
        by_action.setdefault(row["action"], []).append(row)
    assert len(by_action["case_view"]) == 3 and {r["case_id"] for r in by_action["case_view"]} == {str(case_id)}
    assert {"login", "upload", "classify", "export", "token_created"} <= set(by_action)
    assert "cases=1" in by_action["export"][0]["detail"]
    page = c.get("/admin/audit", params={"action": "case_view"}).text
    assert page.count("case viewed") >= 3 and f'href="/cases/{case_id}"' in page
    # the export of the audit log is itself audited
    assert "audit_export" in c.get("/admin/audit.csv", params={"action": "audit_export"}).text
    assert "registro de auditoría" in c.get("/lang/es?next=/admin/audit").text.lower()
