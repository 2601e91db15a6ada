"""Local recalibration over real HTTP with the shipped model made underconfident (its card's temperature x4), as
a model can be in a new hospital: too few readings are refused, the preview's held-out check improves, applying
makes a new version that later results record, and rollback restores the previous calibration."""

from __future__ import annotations

import copy
import csv
import json

import pytest

from .webapp_helpers import live_app, new_token, sign_in


@pytest.fixture(scope="module")
def underconfident():
    from uplink_server.model import Classifier, default_model_path, find_card

    path = default_model_path()
    card = copy.deepcopy(json.loads(find_card(path).read_text()))
    card["calibration"]["temperature"] *= 4
    return Classifier(path, card=card)


def _kermany_test(data_root, label, n):
    with open(data_root / "kermany" / "labels.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test" and r["label"] == label]
    return [data_root / "kermany" / r["path"] for r in rows[:n]]


def test_recalibrate_preview_apply_record_and_roll_back(tmp_path, underconfident, data_root):
    clf = underconfident
    model = f"{clf.name} {clf.version}"
    with live_app(tmp_path / "d", classifier=clf) as (app, base):
        c, csrf = sign_in(base)
        auth = {"Authorization": f"Bearer {new_token(c, csrf)}"}

        def upload(path):
            r = c.post("/api/v1/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")}, headers=auth)
            assert r.status_code == 200, r.text
            return r.json()

        r = c.post("/api/v1/calibration", json={"apply": True}, headers=auth)
        assert r.status_code == 422 and "too few" in r.json()["detail"]
        assert c.get("/api/v1/calibration", headers=auth).json()["versions"] == []

        for label in ("normal", "pneumonia"):
            for p in _kermany_test(data_root, label, 22):
                case = upload(p)
                assert case["calibration_version"] is None
                assert c.post(f"/api/v1/cases/{case['case_id']}/review", json={"reading": label}, headers=auth).status_code == 201
        status = c.get("/api/v1/calibration", headers=auth).json()
        assert status["model"] == model and status["readiness"]["ready"]
        assert status["readiness"]["counts"] == {"normal": 22, "pneumonia": 22, "covid19": 0}

        preview = c.post("/api/v1/calibration", json={"apply": False}, headers=auth).json()["preview"]
        assert preview["temperature"] < 0.5  # it undoes most of the x4
        assert preview["after"]["log_loss"] < preview["before"]["log_loss"] and preview["n_check"] == 22
        assert c.get("/api/v1/calibration", headers=auth).json()["versions"] == []  # a preview writes nothing

        applied = c.post("/api/v1/calibration", json={"apply": True}, headers=auth).json()["applied"]
        assert applied["version"] == 1 and applied["active"]
        probe = _kermany_test(data_root, "pneumonia", 23)[-1]
        after = upload(probe)
        assert after["calibration_version"] == 1
        case = c.get(f"/api/v1/cases/{after['case_id']}", headers=auth).json()
        assert case["label"] == after["label"]  # a temperature never changes the class
        shown = max(after["probabilities"].values())
        assert shown > max(clf.predict(probe).probabilities.values())  # sharper than the model's own

        c.post("/api/v1/calibration", json={"apply": True}, headers=auth)  # v2 replaces v1
        versions = c.get("/api/v1/calibration", headers=auth).json()["versions"]
        assert [(v["version"], v["active"]) for v in versions] == [(2, True), (1, False)]
        assert c.post("/api/v1/calibration/rollback", json={}, headers=auth).json()["active"]["version"] == 1
        assert upload(probe)["calibration_version"] == 1
        assert c.post("/api/v1/calibration/rollback", json={}, headers=auth).json()["active"] is None
        assert upload(probe)["calibration_version"] is None  # the model card's calibration again
        r = c.post("/api/v1/calibration/rollback", json={}, headers=auth)
        assert r.status_code == 422 and "no site calibration" in r.json()["detail"]

        # the page: counts against the minimum, preview, apply and roll back as an admin would
        page = c.get("/performance").text
        assert 'data-testid="recal-counts"' in page and "22/20" in page
        r = c.post("/performance/recalibrate", data={"csrf_token": csrf, "model": model, "action": "preview"})
        assert 'data-testid="recal-preview"' in r.text
        r = c.post("/performance/recalibrate", data={"csrf_token": csrf, "model": model, "action": "apply"})
        assert 'data-testid="recal-v3"' in r.text and 'data-testid="recal-rollback"' in r.text
        audit = c.get("/api/v1/audit.csv", headers=auth).text
        assert audit.count("recalibrate") >= 5


def test_technicians_and_doctors_cannot_recalibrate(tmp_path, classifier, one_xray):
    from .webapp_helpers import add_user

    with live_app(tmp_path / "d", classifier=classifier) as (app, base):
        c, csrf = sign_in(base)
        c.post("/upload", data={"csrf_token": csrf}, files=[("files", ("x.jpg", one_xray.read_bytes(), "image/jpeg"))])
        assert 'data-testid="recalibration"' in c.get("/performance").text  # an admin sees it
        add_user(c, csrf, "doc@clinic.ec", "doctor")
        d, dcsrf = sign_in(base, "doc@clinic.ec", "user-pass-123")
        dauth = {"Authorization": f"Bearer {new_token(d, dcsrf)}"}
        assert d.post("/api/v1/calibration", json={"apply": True}, headers=dauth).status_code == 403
        assert d.post("/performance/recalibrate", data={"csrf_token": dcsrf, "action": "apply"}).status_code == 403
        assert 'data-testid="recalibration"' not in d.get("/performance").text
