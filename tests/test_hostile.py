"""The hostile file and the stolen cookie: ZIP and DICOM bombs refused before they are unpacked, spreadsheet
formulas neutralised, sessions that end, security headers, no orphan files, over-long patient codes refused."""

from __future__ import annotations

import csv
import io
import os
import struct
import subprocess
import sys
import zipfile

import httpx
import numpy as np
import pytest

from .conftest import REPO, subprocess_env
from .test_imaging import make_dicom
from .webapp_helpers import ADMIN, add_user, csrf_of, live_app, new_token, sign_in


@pytest.fixture()
def site(tmp_path, classifier):
    with live_app(tmp_path / "data", classifier=classifier) as (app, base):
        c, csrf = sign_in(base)
        yield app, base, c, csrf


def _stored_files(app) -> set[str]:
    return {p.name for p in app.state.settings.upload_dir.iterdir() if not p.name.endswith(".preview.png")}


def _case_count(c) -> int:
    return c.get("/export.csv").text.count("\n") - 1


def zip_bomb(members: int = 8, mb: int = 60) -> bytes:
    """``members`` files of ``mb`` MB of zeros each, deflated: a few hundred KB on the wire."""
    buf = io.BytesIO()
    zeros = bytes(mb * 1024 * 1024)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(members):
            zf.writestr(f"film{i}.png", zeros)
    return buf.getvalue()


def test_zip_bomb_is_refused_before_unpacking_and_stores_nothing(site):
    app, base, c, csrf = site
    bomb = zip_bomb()
    assert len(bomb) < 1024 * 1024
    before = _stored_files(app)
    r = c.post("/upload", data={"csrf_token": csrf}, files=[("files", ("xrays.zip", bomb, "application/zip"))])
    assert r.status_code == 413 and "before unpacking" in r.text
    assert _stored_files(app) == before and _case_count(c) == 0
    tok = new_token(c, csrf)
    r = httpx.post(f"{base}/api/v1/predict", files={"file": ("x.zip", bomb, "application/zip")},
                   headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 400 and "one image per request" in r.json()["detail"]
    assert c.get("/healthz").json()["ok"]


def test_zip_total_budget_counts_what_is_really_unpacked(tmp_path, classifier, xray_paths):
    from web_app.cases import Upload, UploadError, expand_uploads
    from web_app.config import Settings

    settings = Settings.from_env(tmp_path, max_zip_total_mb=1)
    films = xray_paths["adult_normal"] + xray_paths["covid"]
    buf = io.BytesIO()
    n, size = 0, 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        while size <= 1.5 * 1024 * 1024:  # real films, stored, past a 1 MB budget
            p = films[n % len(films)]
            zf.write(p, f"{n}-{p.name}")
            n, size = n + 1, size + p.stat().st_size
    with pytest.raises(UploadError) as exc:
        expand_uploads([Upload("films.zip", buf.getvalue())], settings)
    assert exc.value.code == "zip_bomb" and exc.value.status == 413
    settings.max_zip_total_mb = 64
    assert len(expand_uploads([Upload("films.zip", buf.getvalue())], settings)) == n


def rle_bomb(rows: int = 7000, cols: int = 7000) -> bytes:
    """A real RLE Lossless DICOM whose runs expand to a rows x cols RGB 16-bit image (294 MB raw, 4-5 MB here)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless, generate_uid

    n = rows * cols
    run = b"\x81\x00"  # -127: the next byte 128 times
    segment = run * (n // 128) + bytes([(n % 128) - 1, 0]) if n % 128 else run * (n // 128)
    segments = [segment] * 6  # 3 samples x 2 bytes
    offsets = [64]
    for s in segments[:-1]:
        offsets.append(offsets[-1] + len(s))
    header = struct.pack("<16I", len(segments), *offsets, *[0] * (15 - len(offsets)))
    frame = header + b"".join(segments)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = RLELossless
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = rows, cols, 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_rle_bomb_is_refused_from_its_header(site):
    from uplink_server.errors import Refusal
    from uplink_server.imaging import decode

    app, base, c, csrf = site
    bomb = rle_bomb()
    assert len(bomb) < 8 * 1024 * 1024
    with pytest.raises(Refusal) as exc:
        decode(bomb)
    assert exc.value.code == "too_many_pixels" and "3 sample(s) of 16 bits" in exc.value.message
    before = _stored_files(app)
    r = c.post("/upload", data={"csrf_token": csrf}, files=[("files", ("bomb.dcm", bomb, "application/dicom"))])
    assert r.status_code == 200 and "too_many_pixels" not in r.text.split("<main")[0]
    assert 'data-testid="refusal"' in r.text
    assert _stored_files(app) == before  # refused: nothing of it written
    # a real 16-bit gray film of ordinary size still passes the budget
    ok = make_dicom((np.random.default_rng(0).random((600, 500)) * 255).astype(np.uint8))
    assert decode(ok).gray.shape == (600, 500)


def test_spreadsheet_formulas_are_neutralised_in_every_export(site, one_xray):
    app, base, c, csrf = site
    code = '=HYPERLINK("http://evil.example","x")'
    r = c.post("/upload", data={"csrf_token": csrf, "patient_code": code},
               files=[("files", ("a.jpeg", one_xray.read_bytes(), "image/jpeg"))])
    assert r.status_code == 200
    rows = list(csv.DictReader(io.StringIO(c.get("/export.csv").text)))
    assert rows[0]["patient_code"] == "'" + code
    audit = c.get("/admin/audit.csv").text
    assert all(not cell.startswith(("=", "+", "-", "@")) for line in csv.reader(io.StringIO(audit)) for cell in line)
    from web_app.spreadsheet import safe_cell

    assert [safe_cell(v) for v in ("+1", "-x", "@a", "\tb", "\rc", "ok", 0.5)] == ["'+1", "'-x", "'@a", "'\tb", "'\rc", "ok", 0.5]


def test_patient_code_over_64_characters_is_refused_not_cut(site, one_xray):
    app, base, c, csrf = site
    before = _stored_files(app)
    r = c.post("/upload", data={"csrf_token": csrf, "patient_code": "P" * 65},
               files=[("files", ("a.jpeg", one_xray.read_bytes(), "image/jpeg"))])
    assert r.status_code == 422 and "longer than 64" in r.text
    tok = new_token(c, csrf)
    r = httpx.post(f"{base}/api/v1/predict", files={"file": ("a.jpeg", one_xray.read_bytes(), "image/jpeg")},
                   data={"patient_code": "P" * 65}, headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 422 and r.json()["refusal"]["code"] == "patient_code_too_long"
    assert _stored_files(app) == before and _case_count(c) == 0


def test_signed_out_cookie_and_reset_password_end_sessions_and_tokens(site):
    app, base, c, csrf = site
    add_user(c, csrf, "doc@clinic.ec", "doctor", "doctor-pass-1")
    saved = dict(c.cookies)
    assert c.get("/worklist").status_code == 200
    c.post("/logout", data={"csrf_token": csrf_of(c.get("/").text)})
    replay = httpx.Client(base_url=base, cookies=saved, follow_redirects=False)
    r = replay.get("/worklist")
    assert r.status_code == 303 and "/login" in r.headers["location"]  # the copied cookie is dead too
    # a doctor signed in on two devices, with an API token; the admin resets the password
    doc1, csrf1 = sign_in(base, "doc@clinic.ec", "doctor-pass-1")
    doc2, _ = sign_in(base, "doc@clinic.ec", "doctor-pass-1")
    tok = new_token(doc1, csrf1)
    api = {"Authorization": f"Bearer {tok}"}
    assert httpx.get(f"{base}/api/v1/cases", headers=api).status_code == 200
    admin, acsrf = sign_in(base)
    doc_id = next(u.id for u in _users(app) if u.email == "doc@clinic.ec")
    r = admin.post(f"/admin/users/{doc_id}/password", data={"csrf_token": acsrf, "password": "new-pass-123"})
    assert r.status_code == 200 and "ends their sign-ins elsewhere (2)" in r.text and "API tokens (1)" in r.text
    for doc in (doc1, doc2):
        assert "/login" in str(doc.get("/worklist").url)
    assert httpx.get(f"{base}/api/v1/cases", headers=api).status_code == 401
    sign_in(base, "doc@clinic.ec", "new-pass-123")
    assert "/login" not in str(admin.get("/admin").url)  # the admin's own session is untouched


def _users(app):
    from web_app.db import User

    with app.state.SessionLocal() as db:
        return db.query(User).all()


def test_unknown_accounts_cost_a_password_check_too(monkeypatch):
    from web_app import security

    calls = []
    real = security._hasher

    class Counting:
        def verify(self, h, p):
            calls.append(h)
            return real.verify(h, p)

        def hash(self, p):
            return real.hash(p)

    monkeypatch.setattr(security, "_hasher", Counting())
    assert security.verify_password("whatever-1", None) is False
    assert len(calls) == 1 and calls[0].startswith("$argon2")


def test_security_headers_on_pages_api_and_errors(site):
    app, base, c, csrf = site
    for path in ("/", "/login", "/api/v1/cases", "/no-such-page", "/healthz", "/static/style.css"):
        h = httpx.get(base + path).headers if path in ("/login", "/healthz") else c.get(path).headers
        assert "frame-ancestors 'none'" in h["content-security-policy"], path
        assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY"
        assert h["referrer-policy"] == "no-referrer"


def test_retries_leave_no_orphan_files(site, one_xray):
    app, base, c, csrf = site
    tok = new_token(c, csrf)
    api = {"Authorization": f"Bearer {tok}"}
    r = httpx.post(f"{base}/api/v1/predict", files={"file": ("a.jpeg", one_xray.read_bytes(), "image/jpeg")}, headers=api,
                   timeout=60)
    case_id = r.json()["case_id"]
    for _ in range(4):
        assert httpx.post(f"{base}/api/v1/cases/{case_id}/retry", headers=api, timeout=60).status_code == 200
    from web_app.db import Case

    with app.state.SessionLocal() as db:
        referenced = {p for case in db.query(Case).all() for p in (case.image_path, case.heatmap_path) if p}
    files = _stored_files(app)
    assert files == referenced, (files - referenced, referenced - files)  # every file referenced, every reference there


def test_create_user_first_makes_the_admin(tmp_path):
    env = subprocess_env(CXR_ADMIN_PASSWORD="first-admin-pass", CXR_DATA_ROOT=os.environ.get("CXR_DATA_ROOT", ""))
    r = subprocess.run([sys.executable, "-m", "web_app", "create-user", "tech@clinic.ec", "--password", "tech-pass-123",
                        "--data-dir", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from web_app.db import User, make_engine, session_factory
    from web_app.security import verify_password

    with session_factory(make_engine(f"sqlite:///{tmp_path / 'app.db'}"))() as db:
        users = {u.email: u for u in db.query(User).all()}
    assert users[ADMIN[0]].role == "admin" and verify_password("first-admin-pass", users[ADMIN[0]].password_hash)
    assert users["tech@clinic.ec"].role == "technician"


@pytest.mark.browser
def test_pages_pass_the_content_security_policy_in_chromium(site, browser, one_xray):
    from .test_browser_doctor import _login, _upload
    from .webapp_helpers import wait_js

    app, base, c, csrf = site
    ctx, page = _login(browser, base, 1280, 800, "en")
    violations = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    _upload(page, [one_xray], "CSP-1")
    page.wait_for_selector("[data-testid=result]")
    if page.locator("[data-testid=heatmap-toggle]").count():
        page.click("[data-testid=heatmap-toggle]")  # an inline handler: must run under the policy
        wait_js(page, "document.querySelector('[data-testid=heatmap]').naturalWidth > 0")  # drawn on first view
        assert page.locator("[data-testid=heatmap]").is_visible()
    for path in ("/cases", "/worklist", "/admin", "/performance", "/tokens"):
        page.goto(base + path)
    ctx.close()
    assert violations == []


def test_forwarded_for_is_believed_only_from_configured_proxies(tmp_path, tiny_model):
    """``python -m web_app serve`` as started by users: a same-host client's X-Forwarded-For does not change the
    address the sign-in lock and the audit log see, unless CXR_TRUSTED_PROXIES names it."""
    from .webapp_helpers import free_port

    def failed_login_address(extra_env: dict) -> str:
        port = free_port()
        env = subprocess_env(CXR_ADMIN_PASSWORD=ADMIN[1], CXR_MODEL=str(tiny_model), **extra_env)
        data = tmp_path / f"d{port}"
        proc = subprocess.Popen([sys.executable, "-m", "web_app", "serve", "--port", str(port), "--data-dir", str(data)],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            from .webapp_helpers import wait_until

            def up():
                try:
                    return httpx.get(base + "/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            assert wait_until(up, 60)
            c = httpx.Client(base_url=base, follow_redirects=True)
            page = c.get("/login").text
            c.post("/login", data={"email": ADMIN[0], "password": "wrong-password", "csrf_token": csrf_of(page)},
                   headers={"X-Forwarded-For": "203.0.113.77"})
            admin, _ = sign_in(base)
            rows = list(csv.DictReader(io.StringIO(admin.get("/admin/audit.csv").text)))
            return next(r["address"] for r in rows if r["action"] == "login_failed")
        finally:
            proc.terminate()
            proc.wait(20)

    assert failed_login_address({}) == "127.0.0.1"
    assert failed_login_address({"CXR_TRUSTED_PROXIES": "127.0.0.1"}) == "203.0.113.77"
