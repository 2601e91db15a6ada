"""The web app over real HTTP: pages, API, roles, DICOM de-identification, uplinks."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import zipfile

import numpy as np
import pytest

from uplink_server import deidentify

from .test_imaging import make_dicom
from .webapp_helpers import ADMIN, _run_client_in_thread, add_user, csrf_of, live_app, new_token, sign_in, wait_until


@pytest.fixture()
def app_local(tmp_path, classifier):
    with live_app(tmp_path / "data", classifier=classifier) as (app, base):
        yield app, base


def test_upload_page_flow_and_history(app_local, xray_paths):
    app, base = app_local
    c, csrf = sign_in(base)
    img = xray_paths["covid"][0].read_bytes()
    r = c.post("/upload", data={"csrf_token": csrf, "patient_code": "EC-001"}, files=[("files", ("cxr.jpg", img, "image/jpeg"))])
    assert r.status_code == 200 and "/cases/" in str(r.url)
    assert 'data-testid="probabilities"' in r.text and "not a diagnosis" in r.text
    case_id = int(str(r.url).rsplit("/", 1)[1])
    assert c.get(f"/cases/{case_id}/heatmap.png").headers["content-type"] == "image/png"
    assert c.get(f"/cases/{case_id}/image.png").status_code == 200
    hist = c.get("/cases", params={"q": "EC-00"})
    assert f'href="/cases/{case_id}"' in hist.text
    assert f'href="/cases/{case_id}"' not in c.get("/cases", params={"q": "nobody"}).text
    assert "Printable report" in c.get(f"/cases/{case_id}/report").text
    csv_text = c.get("/export.csv").text
    assert csv_text.splitlines()[0].startswith("id,patient_code") and "EC-001" in csv_text


def test_a_dicom_upload_is_parsed_once(app_local, xray_paths, monkeypatch):
    """Decoding, de-identification, storage and the model all work from the one pydicom Dataset read at upload."""
    import pydicom
    from PIL import Image

    app, base = app_local
    c, csrf = sign_in(base)
    dcm = make_dicom(np.asarray(Image.open(xray_paths["covid"][0]).convert("L")))
    reads = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: reads.append(1) or real(*a, **k))
    r = c.post("/api/v1/predict", files={"file": ("x.dcm", dcm, "application/dicom")},
               headers={"Authorization": f"Bearer {new_token(c, csrf)}"})
    assert r.status_code == 200 and r.json()["status"] == "done"
    assert len(reads) == 1


def zip_of(paths) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in paths:
            zf.write(p, p.name)
    return buf.getvalue()


def test_zip_and_several_files(app_local, xray_paths):
    app, base = app_local
    c, csrf = sign_in(base)
    r = c.post("/upload", data={"csrf_token": csrf, "patient_code": "Z-1"},
               files=[("files", ("batch.zip", zip_of(xray_paths["kermany_normal"][:3]), "application/zip")),
                      ("files", ("one.jpeg", xray_paths["adult_normal"][0].read_bytes(), "image/jpeg"))])
    assert r.status_code == 200 and "/batch" in str(r.url)
    assert r.text.count('data-testid="result"') == 4


def test_csrf_required(app_local, one_xray):
    app, base = app_local
    c, _ = sign_in(base)
    r = c.post("/upload", data={"csrf_token": "forged"}, files=[("files", ("a.jpeg", one_xray.read_bytes(), "image/jpeg"))])
    assert r.status_code == 403


def test_api_auth_failures_and_types(app_local, one_xray):
    app, base = app_local
    import httpx

    anon = httpx.Client(base_url=base)
    files = {"file": ("a.jpeg", one_xray.read_bytes(), "image/jpeg")}
    assert anon.post("/api/v1/predict", files=files).status_code == 401
    assert anon.post("/api/v1/predict", files=files, headers={"Authorization": "Bearer cxr_wrong"}).status_code == 401
    c, csrf = sign_in(base)
    assert c.post("/api/v1/predict", files=files).status_code == 403  # browser session without the CSRF header
    tok = new_token(c, csrf)
    h = {"Authorization": f"Bearer {tok}"}
    r = anon.post("/api/v1/predict", files=files, data={"patient_code": "API-1"}, headers=h)
    body = r.json()
    assert r.status_code == 200 and body["case_id"] and body["label"] and not body["refused"]
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-5 and body["model_version"]
    assert anon.get(f"/api/v1/cases/{body['case_id']}", headers=h).json()["patient_code"] == "API-1"
    r = anon.post("/api/v1/predict", files={"file": ("x.exe", b"MZ\x90\x00" * 100, "application/octet-stream")}, headers=h)
    assert r.status_code == 415
    # the name is only a hint: an X-ray called .exe is still an X-ray
    r = anon.post("/api/v1/predict", files={"file": ("scan.exe", one_xray.read_bytes(), "application/octet-stream")}, headers=h)
    assert r.status_code == 200 and r.json()["label"]
    r = anon.post("/api/v1/predict", files={"file": ("x.png", b"not really a png", "image/png")},
                  headers={**h, "Accept-Language": "es-EC,es;q=0.9"})
    assert r.status_code == 415 and r.json()["refused"] and r.json()["refusal"]["code"] == "not_an_image"
    assert "no es una imagen" in r.json()["refusal"]["message"]
    assert r.json()["case_id"]  # the refusal is logged as a case too
    schema = anon.get("/openapi.json").json()
    assert "/api/v1/predict" in schema["paths"]


def test_roles(app_local, xray_paths):
    app, base = app_local
    admin, csrf = sign_in(base)
    add_user(admin, csrf, "tech@clinic.ec", "technician")
    add_user(admin, csrf, "doc@clinic.ec", "doctor")
    admin.post("/upload", data={"csrf_token": csrf, "patient_code": "ADMIN-CASE"},
               files=[("files", ("a.jpeg", xray_paths["kermany_normal"][0].read_bytes(), "image/jpeg"))])
    tech, tcsrf = sign_in(base, "tech@clinic.ec", "user-pass-123")
    r = tech.post("/upload", data={"csrf_token": tcsrf, "patient_code": "TECH-CASE"},
                  files=[("files", ("b.jpeg", xray_paths["kermany_pneumonia"][0].read_bytes(), "image/jpeg"))])
    tech_case = str(r.url).rsplit("/", 1)[1]
    hist = tech.get("/cases").text
    assert "TECH-CASE" in hist and "ADMIN-CASE" not in hist
    assert tech.get("/worklist").status_code == 403 and tech.get("/export.csv").status_code == 403
    assert tech.get("/admin").status_code == 403
    admin_case = [line for line in admin.get("/cases?q=ADMIN-CASE").text.split('href="/cases/')[1:]][0].split('"')[0]
    assert tech.get(f"/cases/{admin_case}").status_code == 404
    doc, _ = sign_in(base, "doc@clinic.ec", "user-pass-123")
    assert "TECH-CASE" in doc.get("/cases").text and "ADMIN-CASE" in doc.get("/cases").text
    wl = doc.get("/worklist")
    assert wl.status_code == 200 and f'href="/cases/{tech_case}"' in wl.text
    assert doc.get("/admin").status_code == 403
    assert "Wrong email or password" in sign_in_fails(base)


def sign_in_fails(base):
    import httpx

    c = httpx.Client(base_url=base, follow_redirects=True)
    r = c.post("/login", data={"email": ADMIN[0], "password": "nope", "csrf_token": csrf_of(c.get("/login").text)})
    assert r.status_code == 401
    return r.text


def test_worklist_orders_by_risk(app_local, xray_paths):
    app, base = app_local
    c, csrf = sign_in(base)
    for p in xray_paths["kermany_normal"][:2] + xray_paths["covid"][:2]:
        c.post("/upload", data={"csrf_token": csrf}, files=[("files", (p.name, p.read_bytes(), "image/jpeg"))])
    from web_app.db import Case

    with app.state.SessionLocal() as db:
        risks = {c.id: c.risk for c in db.query(Case).all()}
    order = [int(x.split('"')[0]) for x in c.get("/worklist").text.split('<td><a href="/cases/')[1:]]
    assert [risks[i] for i in order] == sorted(risks.values(), reverse=True)


def test_model_unavailable_keeps_the_upload(tmp_path, one_xray, tiny_model):
    from uplink_server.model import Classifier

    with live_app(tmp_path / "d", classifier=None) as (app, base):
        c, csrf = sign_in(base)
        tok = new_token(c, csrf)
        import httpx

        api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tok}"}, timeout=60)
        r = api.post("/api/v1/predict", files={"file": ("a.jpeg", one_xray.read_bytes(), "image/jpeg")})
        assert r.status_code == 503 and r.json()["status"] == "pending" and r.json()["case_id"]
        case_id = r.json()["case_id"]
        page = c.get(f"/cases/{case_id}").text
        assert "No model is available right now" in page
        # a model becomes available; the kept image is classified on retry
        from web_app.db import Case

        with app.state.SessionLocal() as db:
            assert db.get(Case, case_id).attempts == 1  # the try at upload, counted in the insert itself
        app.state.router.local = Classifier(tiny_model)
        r = api.post(f"/api/v1/cases/{case_id}/retry")
        assert r.status_code == 200 and r.json()["status"] == "done"
        with app.state.SessionLocal() as db:
            assert db.get(Case, case_id).attempts == 2


# --- uplinks ---------------------------------------------------------------------

def _api(base, app_client_pair=None):
    import httpx

    c, csrf = sign_in(base)
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {new_token(c, csrf)}"}, timeout=60)


_wait = wait_until


def test_remote_model_server_serves_and_reconnects(tmp_path, tiny_model, one_xray):
    from uplink_server.model import Classifier
    from uplink_server.uplink import UplinkClient

    from .webapp_helpers import free_port

    port, data = free_port(), tmp_path / "d"
    files = {"file": ("a.jpeg", one_xray.read_bytes(), "image/jpeg")}
    client = None
    with live_app(data, classifier=None, port=port) as (app, base):
        client = UplinkClient(base, app.state.settings.uplink_key, Classifier(tiny_model), max_concurrency=2,
                              name="gpu-box", heartbeat_s=2, backoff_max_s=1.5)
        _run_client_in_thread(client)
        assert _wait(lambda: app.state.router.uplinks)
        r = _api(base).post("/api/v1/predict", files=files)
        assert r.status_code == 200 and r.json()["served_by"] == "uplink:gpu-box"
    assert _wait(lambda: not client.connected.is_set())
    # the web app comes back on the same address: the model server reconnects by itself
    with live_app(data, classifier=None, port=port) as (app, base):
        assert _wait(lambda: app.state.router.uplinks, 30)
        r = _api(base).post("/api/v1/predict", files=files)
        assert r.status_code == 200 and r.json()["served_by"] == "uplink:gpu-box"
    client.stop()


def test_wrong_uplink_key_is_refused(tmp_path, tiny_model):
    from uplink_server.model import Classifier
    from uplink_server.uplink import AuthenticationFailed, UplinkClient

    with live_app(tmp_path / "d", classifier=None) as (app, base):
        client = UplinkClient(base, "wrong-key", Classifier(tiny_model))
        with pytest.raises(AuthenticationFailed):
            asyncio.run(client.run_forever())
        assert not app.state.router.uplinks


@pytest.mark.parametrize("with_local", [True, False])
def test_model_server_disconnecting_mid_request(tmp_path, classifier, one_xray, with_local):
    import websockets

    from uplink_server.uplink import ws_url

    with live_app(tmp_path / "d", classifier=classifier if with_local else None) as (app, base):
        got_request = threading.Event()

        async def rogue():
            async with websockets.connect(ws_url(base), additional_headers={"Authorization": f"Bearer {app.state.settings.uplink_key}"}) as ws:
                await ws.send(json.dumps({"type": "hello", "name": "flaky", "capacity": 1}))
                await ws.recv()
                msg = json.loads(await ws.recv())
                sent = base64.b64decode(msg["data"])
                assert msg["type"] == "predict" and sent[:2] == b"\xff\xd8"  # the stored JPEG, metadata stripped
                assert sent == deidentify.strip_jpeg(one_xray.read_bytes())
                got_request.set()
                # the link drops without an answer

        th = threading.Thread(target=lambda: asyncio.run(rogue()), daemon=True)
        th.start()
        assert _wait(lambda: app.state.router.uplinks)
        r = _api(base).post("/api/v1/predict", files={"file": ("a.jpeg", one_xray.read_bytes(), "image/jpeg")})
        assert got_request.is_set()
        assert not app.state.router.uplinks  # taken out of rotation
        if with_local:
            assert r.status_code == 200 and r.json()["served_by"] == "local"
        else:
            assert r.status_code == 503 and r.json()["status"] == "pending"
            stored = [p for p in app.state.settings.upload_dir.iterdir() if ".preview" not in p.name]
            assert len(stored) == 1  # nothing lost


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from web_app.db import migrations_config

    return ScriptDirectory.from_config(migrations_config("sqlite://")).get_current_head()


def test_migration_removes_stored_upload_names(tmp_path):
    """A database from before 0002 loses the original file names it kept."""
    import sqlalchemy as sa
    from alembic import command

    from web_app.db import migrate, migrations_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(migrations_config(url), "0001")
    eng = sa.create_engine(url)
    with eng.begin() as c:
        c.execute(sa.text("INSERT INTO users (id, email, name, password_hash, role, active, created_at) "
                          "VALUES (1, 'a@b', '', 'x', 'admin', 1, '2026-01-01')"))
        c.execute(sa.text("INSERT INTO cases (id, patient_code, created_at, created_by, filename, image_path, status, uncertain) "
                          "VALUES (7, 'P', '2026-01-01', 1, 'Juana_Perez_1962.jpg', 'x.jpg', 'done', 0)"))
        c.execute(sa.text("INSERT INTO audit_log (at, user_id, action, case_id, detail) "
                          "VALUES ('2026-01-01', 1, 'upload', 7, '{\"filename\": \"Juana_Perez_1962.jpg\"}')"))
    migrate(url)
    with eng.begin() as c:
        assert c.execute(sa.text("SELECT filename FROM cases")).scalar() == "case-7"
        assert c.execute(sa.text("SELECT detail FROM audit_log")).scalar() is None
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == head_revision()
    eng.dispose()
    assert b"Juana_Perez" not in (tmp_path / "old.db").read_bytes()  # not even in freed pages (secure_delete)


@pytest.mark.postgres
def test_postgres_database(tmp_path, classifier, one_xray):
    psycopg = pytest.importorskip("psycopg")
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    try:
        conn = psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=3)
    except Exception as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    with conn:
        conn.execute("DROP TABLE IF EXISTS user_sessions, reviews, site_settings, site_calibrations, audit_log, api_tokens, cases, users, sign_in_failures, alembic_version CASCADE")
    with live_app(tmp_path / "d", classifier=classifier, database_url=url) as (app, base):
        r = _api(base).post("/api/v1/predict", files={"file": ("a.jpeg", one_xray.read_bytes(), "image/jpeg")},
                            data={"patient_code": "PG-1"})
        assert r.status_code == 200
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test") as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == head_revision()
        assert conn.execute("SELECT count(*) FROM cases WHERE patient_code = 'PG-1'").fetchone()[0] == 1
        conn.execute("DROP TABLE IF EXISTS user_sessions, reviews, site_settings, site_calibrations, audit_log, api_tokens, cases, users, sign_in_failures, alembic_version CASCADE")


def test_oversized_upload_refused_without_500(tmp_path, classifier, one_xray):
    with live_app(tmp_path / "d", classifier=classifier, max_upload_mb=1) as (app, base):
        api = _api(base)
        big = one_xray.read_bytes() + b"\0" * (2 * 1024 * 1024)
        r = api.post("/api/v1/predict", files={"file": ("big.jpeg", big, "image/jpeg")})
        assert r.status_code == 413 and r.json()["refusal"]["code"] == "file_too_large"
        c, csrf = sign_in(base)
        r = c.post("/upload", data={"csrf_token": csrf}, files=[("files", ("big.jpeg", big, "image/jpeg"))])
        assert r.status_code == 413 and "too large" in r.text


def test_broken_zip_and_truncated_dicom(app_local, xray_paths):
    from PIL import Image

    app, base = app_local
    c, csrf = sign_in(base)
    whole = zip_of(xray_paths["kermany_normal"][:2])
    broken = whole[: len(whole) // 2]  # cut off mid-archive: no central directory
    r = c.post("/upload", data={"csrf_token": csrf}, files=[("files", ("batch.zip", broken, "application/zip"))])
    assert r.status_code == 400 and "ZIP file could not be read" in r.text
    api = _api(base)
    r = api.post("/api/v1/predict", files={"file": ("batch.zip", broken, "application/zip")})
    assert r.status_code == 400 and r.json()["refusal"]["code"] == "zip_error"
    dcm = make_dicom(np.asarray(Image.open(xray_paths["adult_normal"][0]).convert("L")))
    for cut in (200, 400, len(dcm) // 2):
        r = api.post("/api/v1/predict", files={"file": ("cut.dcm", dcm[:cut], "application/dicom")})
        assert r.status_code == 422 and r.json()["refusal"]["code"] == "corrupt_image", cut
    # what cannot be read cannot be de-identified, so nothing of it is stored
    assert not list(app.state.settings.upload_dir.glob("*.dcm"))


def test_rotate_turns_the_stored_image_and_analyzes_again(app_local, xray_paths):
    """The control offered when an upload is refused as not a chest X-ray (often one lying on its side)."""
    from PIL import Image

    app, base = app_local
    c, csrf = sign_in(base)
    src = xray_paths["adult_normal"][1]
    r = c.post("/upload", data={"csrf_token": csrf, "patient_code": "ROT-1"}, files=[("files", ("a.jpg", src.read_bytes(), "image/jpeg"))])
    case_id = int(str(r.url).rsplit("/", 1)[1])
    from web_app.db import AuditLog, Case

    with app.state.SessionLocal() as db:
        path = app.state.settings.upload_dir / db.get(Case, case_id).image_path
    before = np.asarray(Image.open(path))
    r = c.post(f"/cases/{case_id}/rotate", data={"csrf_token": csrf})
    assert r.status_code == 200 and str(r.url).endswith(f"/cases/{case_id}")
    with app.state.SessionLocal() as db:
        turned = app.state.settings.upload_dir / db.get(Case, case_id).image_path
    # a quarter turn clockwise, kept lossless (a stored JPEG becomes a PNG of the turned pixels, the JPEG goes)
    assert np.array_equal(np.asarray(Image.open(turned)), np.rot90(before, -1))
    assert (turned.suffix, path.exists()) == ((".png", False) if path.suffix == ".jpg" else (path.suffix, True))
    r = c.post(f"/cases/{case_id}/rotate", data={"csrf_token": csrf, "turns": "2"})  # upside down: one press
    assert np.array_equal(np.asarray(Image.open(turned)), np.rot90(before, -3))
    assert c.post(f"/cases/{case_id}/rotate", data={"csrf_token": csrf, "turns": "5"}).status_code == 400
    with app.state.SessionLocal() as db:
        assert db.query(AuditLog).filter(AuditLog.action == "classify", AuditLog.case_id == case_id).count() == 3
    assert c.post(f"/cases/{case_id}/rotate", data={"csrf_token": "forged"}).status_code == 403
    dcm = make_dicom(np.asarray(Image.open(src).convert("L"))[:, :200])  # not square, so the turn shows
    r = c.post("/upload", data={"csrf_token": csrf, "patient_code": "ROT-2"}, files=[("files", ("b.dcm", dcm, "application/dicom"))])
    dcase = int(str(r.url).rsplit("/", 1)[1])
    c.post(f"/cases/{dcase}/rotate", data={"csrf_token": csrf})
    import pydicom

    with app.state.SessionLocal() as db:
        ds = pydicom.dcmread(app.state.settings.upload_dir / db.get(Case, dcase).image_path)
    assert (ds.Rows, ds.Columns) == (200, 224) and ds.PatientIdentityRemoved == "YES"


def test_office_document_and_unreachable_broker_get_clear_answers(tmp_path, classifier, one_xray):
    """A .docx is a ZIP but not of images: refused as such, not unpacked into cases; a broker that
    is down at start-up leaves the app serving with its own model."""
    from .webapp_helpers import free_port

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        zf.writestr("word/document.xml", "<w:document/>")
    with live_app(tmp_path / "d", classifier=classifier, broker_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/") as (app, base):
        api = _api(base)
        r = api.post("/api/v1/predict", files={"file": ("informe.docx", buf.getvalue(), "application/octet-stream")})
        assert r.status_code == 415 and r.json()["refusal"]["code"] == "unsupported_type" and r.json()["refusal"]["next_step"]
        r = api.post("/api/v1/predict", files={"file": ("a.jpeg", one_xray.read_bytes(), "image/jpeg")})
        assert r.status_code == 200 and r.json()["served_by"] == "local"
        assert api.get("/api/v1/status").json()["broker"] is None


def test_the_in_process_heatmap_is_drawn_on_first_view_and_matches_the_servers_picture(app_local, xray_paths, classifier):
    """The upload keeps the class map (a few hundred bytes); the first view draws the same picture the model
    would have drawn at upload time, keeps it, and a retry's new answer replaces both."""
    from PIL import Image

    from web_app.db import Case

    app, base = app_local
    c, csrf = sign_in(base)
    src = xray_paths["kermany_pneumonia"][0]
    r = c.post("/upload", data={"csrf_token": csrf, "patient_code": "HM-1"}, files=[("files", ("a.jpg", src.read_bytes(), "image/jpeg"))])
    case_id = int(str(r.url).rsplit("/", 1)[1])
    up = app.state.settings.upload_dir
    with app.state.SessionLocal() as db:
        kept = db.get(Case, case_id).heatmap_path
    assert kept.endswith(".heatmap.json") and (up / kept).stat().st_size < 8000
    assert not (up / kept).with_suffix(".png").exists()  # nothing drawn yet
    first = c.get(f"/cases/{case_id}/heatmap.png")
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    drawn = (up / kept).with_suffix(".png")
    assert drawn.read_bytes() == first.content and c.get(f"/cases/{case_id}/heatmap.png").content == first.content
    direct = classifier.predict(src)  # the model drawing it at once, as a model server does
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first.content))), np.asarray(Image.open(io.BytesIO(direct.heatmap_png))))
    c.post(f"/cases/{case_id}/retry", data={"csrf_token": csrf})
    with app.state.SessionLocal() as db:
        again = db.get(Case, case_id).heatmap_path
    assert again != kept and not (up / kept).exists() and not drawn.exists()  # the old map and its picture are gone
    assert c.get(f"/cases/{case_id}/heatmap.png").status_code == 200
