"""Doctor review and on-site performance over real HTTP, with a tiny real model and real X-rays: the review
route and its permissions, history kept, bad input refused with nothing written, the worklist order and filters,
the report, and the performance numbers checked against scikit-learn and scipy on the same cases."""

from __future__ import annotations

import numpy as np
import pytest

from model_training.data.labels import CLASSES

from .webapp_helpers import add_user, live_app, new_token, sign_in


@pytest.fixture()
def site(tmp_path, classifier, xray_paths):
    """A web app with ten analysed studies and one refused, and an admin's API client."""
    with live_app(tmp_path / "data", classifier=classifier) as (app, base):
        c, csrf = sign_in(base)
        auth = {"Authorization": f"Bearer {new_token(c, csrf)}"}
        ids = []
        images = [p for kind in ("covid", "kermany_pneumonia", "kermany_normal", "adult_normal") for p in xray_paths[kind]][:10]
        for i, p in enumerate(images):
            r = c.post("/api/v1/predict", files={"file": (p.name, p.read_bytes(), "image/jpeg")},
                       data={"patient_code": f"P-{i}"}, headers=auth)
            assert r.status_code == 200, r.text
            ids.append(r.json()["case_id"])
        r = c.post("/api/v1/predict", files={"file": ("notes.txt", b"not an x-ray at all", "text/plain")}, headers=auth)
        assert r.status_code == 415
        refused = c.get("/api/v1/cases", headers=auth).json()[0]["id"]  # the newest: kept as a refused case
        assert refused not in ids
        yield app, base, c, csrf, auth, ids, refused


def _review(c, auth, case_id, reading, **kw):
    return c.post(f"/api/v1/cases/{case_id}/review", json={"reading": reading, **kw}, headers=auth)


def test_review_is_recorded_kept_as_history_and_shown(site):
    app, base, c, csrf, auth, ids, _ = site
    case = c.get(f"/api/v1/cases/{ids[0]}", headers=auth).json()
    assert case["review"] is None
    other = next(x for x in CLASSES if x != case["label"])
    r = _review(c, auth, ids[0], case["label"], note="clear consolidation")
    assert r.status_code == 201 and r.json()["review"]["agrees"] is True and r.json()["review"]["reviewer"] == "admin@localhost"
    r = _review(c, auth, ids[0], other, agrees=False, note="second look: I read it differently")
    assert r.json()["review"]["reading"] == other and r.json()["review"]["agrees"] is False
    history = c.get(f"/api/v1/cases/{ids[0]}/reviews", headers=auth).json()
    assert [h["reading"] for h in history] == [other, case["label"]]  # never overwritten, newest first
    page = c.get(f"/cases/{ids[0]}").text
    assert 'data-testid="review-current"' in page and "disagrees with the AI" in page and 'data-testid="review-history"' in page
    report = c.get(f"/cases/{ids[0]}/report").text
    assert "second look" in report and "admin@localhost" in report
    assert "Not reviewed by a doctor" in c.get(f"/cases/{ids[1]}/report").text  # unreviewed results say so
    csv_text = c.get("/export.csv").text
    assert "reading,agrees,reviewer" in csv_text.splitlines()[0] and f"{other},False,admin@localhost" in csv_text


def test_bad_reviews_are_refused_with_a_reason_and_change_nothing(site):
    app, base, c, csrf, auth, ids, refused = site
    r = _review(c, auth, ids[1], "effusion")
    assert r.status_code == 422 and "unknown reading" in r.json()["detail"]
    r = _review(c, auth, refused, "normal")
    assert r.status_code == 422 and "no AI result" in r.json()["detail"]
    # a review cannot contradict itself: agreement is what the reading says, or nothing is written
    ai = c.get(f"/api/v1/cases/{ids[1]}", headers=auth).json()["label"]
    other = next(x for x in CLASSES if x != ai)
    r = _review(c, auth, ids[1], other, agrees=True)
    assert r.status_code == 422 and "cannot be stored as agreement" in r.json()["detail"]
    r = _review(c, auth, ids[1], ai, agrees=False)
    assert r.status_code == 422 and "cannot be stored as disagreement" in r.json()["detail"]
    r = c.post(f"/cases/{ids[1]}/review", data={"csrf_token": csrf, "reading": other, "agrees": "yes"})
    assert r.status_code == 422 and "contradict each other" in r.text
    r = _review(c, auth, ids[1], "normal", note="x" * 1001)
    assert r.status_code == 422
    assert _review(c, auth, 99999, "normal").status_code == 404
    assert c.get(f"/api/v1/cases/{ids[1]}/reviews", headers=auth).json() == []
    assert c.get(f"/api/v1/cases/{refused}/reviews", headers=auth).json() == []
    # the page shows the reason in the chosen language and writes nothing
    r = c.post(f"/cases/{ids[1]}/review", data={"csrf_token": csrf, "reading": "effusion"}, headers={"Accept-Language": "es"})
    assert r.status_code == 422 and "Elija una lectura" in r.text
    assert c.get(f"/api/v1/cases/{ids[1]}/reviews", headers=auth).json() == []


def test_technicians_review_only_when_an_admin_allows_it(site, xray_paths):
    app, base, c, csrf, auth, ids, _ = site
    add_user(c, csrf, "tech@clinic.ec", "technician")
    t, tcsrf = sign_in(base, "tech@clinic.ec", "user-pass-123")
    tauth = {"Authorization": f"Bearer {new_token(t, tcsrf)}"}
    image = xray_paths["covid"][1]
    own = t.post("/api/v1/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")}, headers=tauth).json()
    assert _review(t, tauth, ids[0], "normal").status_code == 404  # another's case: not theirs to see
    r = _review(t, tauth, own["case_id"], own["label"])
    assert r.status_code == 403 and "admin can allow" in r.json()["detail"]
    assert t.get("/api/v1/performance", headers=tauth).status_code == 403
    assert t.get("/performance").status_code == 403 and 'data-testid="nav-performance"' not in t.get("/").text
    assert t.get("/performance.pdf").status_code == 403 and t.get("/api/v1/site-export.zip", headers=tauth).status_code == 403
    assert 'data-testid="review-form"' not in t.get(f"/cases/{own['case_id']}").text
    # the admin allows it
    assert c.post("/admin/site", data={"csrf_token": csrf, "technicians_review": "1"}).status_code == 200
    assert 'data-testid="review-form"' in t.get(f"/cases/{own['case_id']}").text
    assert _review(t, tauth, own["case_id"], own["label"]).status_code == 201
    assert t.get("/api/v1/performance", headers=tauth).status_code == 200
    audit = c.get("/api/v1/audit.csv", headers=auth).text
    assert "site_setting" in audit and "review" in audit
    c.post("/admin/site", data={"csrf_token": csrf})  # and takes it back
    assert t.get("/api/v1/performance", headers=tauth).status_code == 403
    assert _review(t, tauth, own["case_id"], "normal").status_code == 403


def test_worklist_puts_unread_studies_first_by_risk_with_filters(site):
    app, base, c, csrf, auth, ids, refused = site
    cases = {x["id"]: x for x in c.get("/api/v1/cases", headers=auth).json()}
    riskiest = max(ids, key=lambda i: cases[i]["risk"])
    label = cases[riskiest]["label"]
    _review(c, auth, riskiest, label)
    disagree = min(ids, key=lambda i: cases[i]["risk"])
    _review(c, auth, disagree, "other", agrees=False)
    page = c.get("/worklist").text
    order = [int(s.split('"')[0]) for s in page.split('data-testid="row-')[1:]]
    unread = [i for i in order if i in ids and i not in (riskiest, disagree)]
    assert order.index(riskiest) > max(order.index(i) for i in unread)  # read studies after every unread one
    assert unread == sorted(unread, key=lambda i: -cases[i]["risk"])  # unread ones by risk
    only = lambda f: {int(s.split('"')[0]) for s in c.get(f"/worklist?filter={f}").text.split('data-testid="row-')[1:]}
    assert only("unreviewed") == set(ids) - {riskiest, disagree}
    assert only("disagreements") == {disagree}
    assert only("refused") == {refused}


def test_performance_matches_scikit_learn_on_the_same_cases(site, classifier):
    from scipy.stats import binomtest
    from sklearn.metrics import confusion_matrix, recall_score

    app, base, c, csrf, auth, ids, refused = site
    cases = {x["id"]: x for x in c.get("/api/v1/cases", headers=auth).json()}
    rng = np.random.default_rng(0)
    readings = {}
    for i in ids[:8]:  # a doctor who agrees about half the time
        readings[i] = cases[i]["label"] if rng.random() < 0.5 else str(rng.choice(CLASSES))
        assert _review(c, auth, i, readings[i]).status_code == 201
    _review(c, auth, ids[8], "not_assessable")
    perf = c.get("/api/v1/performance", headers=auth).json()
    assert list(perf["by_model"]) == [f"{classifier.name} {classifier.version}"]
    m = perf["by_model"][f"{classifier.name} {classifier.version}"]
    assert perf["refused_before_analysis"] == 1  # the text file: no model's doing
    assert m["cases"] == 10 and m["analysed"] == 10 and m["reviewed"] == 9 and m["compared"] == 8
    assert m["other_readings"] == {"not_assessable": 1} and m["share_refused"] == 0
    y_true = [readings[i] for i in ids[:8]]
    y_pred = [cases[i]["label"] for i in ids[:8]]
    assert m["readings"] == [*CLASSES, "other"] and m["confusion_matrix"][-1] == [0] * len(CLASSES)
    assert m["confusion_matrix"][:-1] == confusion_matrix(y_true, y_pred, labels=list(CLASSES)).tolist()
    sens = recall_score(y_true, y_pred, labels=list(CLASSES), average=None, zero_division=np.nan)
    for k, cls in enumerate(CLASSES):
        pc = m["per_class"][cls]
        if np.isnan(sens[k]):
            assert pc["sensitivity"] is None
            continue
        assert pc["sensitivity"] == pytest.approx(sens[k])
        tp = sum(t == cls and p == cls for t, p in zip(y_true, y_pred))
        ci = binomtest(tp, pc["n"]).proportion_ci(method="wilson")
        assert pc["sensitivity_ci95"] == pytest.approx([ci.low, ci.high], abs=1e-9)
        neg = [(t, p) for t, p in zip(y_true, y_pred) if t != cls]
        spec = sum(p != cls for _, p in neg) / len(neg)
        assert pc["specificity"] == pytest.approx(spec)
    assert m["agreement"] == pytest.approx(np.mean([t == p for t, p in zip(y_true, y_pred)]))
    page = c.get("/performance", headers={"Accept-Language": "es"}).text
    assert "Desempeño en este centro" in page and 'data-testid="confusion"' in page


def test_reviewed_cases_round_trip_into_model_training(site, tmp_path, classifier):
    """Export the reviewed cases, read them as a model_training manifest and fine-tune on them with public data."""
    import io
    import zipfile
    from pathlib import Path

    from model_training.cli import main
    from model_training.data.datasets import load_spec

    app, base, c, csrf, auth, ids, refused = site
    readings = {ids[0]: "covid19", ids[1]: "pneumonia", ids[2]: "normal", ids[3]: "other"}
    for i, reading in readings.items():
        assert _review(c, auth, i, reading).status_code == 201
    r = c.get("/api/v1/site-export.zip", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    out = tmp_path / "site"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(out)
    records = load_spec(str(out / "manifest.csv"))
    assert {int(Path(x.path).stem.split("-")[1]): x.label for x in records} == \
        {i: lab for i, lab in readings.items() if lab != "other"}  # the doctor's label; "other" is no class
    assert {x.source for x in records} == {"site:clinic"} and all(x.patient_id.startswith("P-") for x in records)
    from uplink_server import deidentify

    for x in records:  # de-identified as stored: pixels only (stripping again changes nothing)
        data = Path(x.path).read_bytes()
        assert Path(x.path).suffix in (".png", ".jpg")
        assert (deidentify.strip_jpeg if x.path.endswith(".jpg") else deidentify.strip_png)(data) == data
    run = tmp_path / "run"
    assert main(["train", "--data", f"{out / 'manifest.csv'}+public", "--img-size", "64", "--epochs", "1", "--limit", "10",
                 "--batch-size", "8", "--workers", "0", "--out", str(run), "--no-progress"]) == 0
    card = (run / "model_card.json").read_text()
    assert "site:clinic" in card
    page = c.get("/performance").text
    assert 'href="/site-export.zip"' in page


def test_reliability_plot_and_exports(site):
    app, base, c, csrf, auth, ids, refused = site
    cases = {x["id"]: x for x in c.get("/api/v1/cases", headers=auth).json()}
    for i in ids[:6]:
        _review(c, auth, i, cases[i]["label"] if i % 2 else "normal")
    page = c.get("/performance").text
    assert 'data-testid="reliability-plot"' in page and "data:image/png;base64," in page
    assert 'data-testid="drift-unavailable"' in page  # the tiny model's card has no reference data
    m = c.get("/api/v1/performance", headers=auth).json()["by_model"]
    rel = next(iter(m.values()))["reliability"]
    assert sum(b["n"] for b in rel["bins"]) == 6 and 0 <= rel["ece"] <= 1
    pdf = c.get("/performance.pdf", headers={"Accept-Language": "es"})
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF") and pdf.content.count(b"/Type /Page") >= 1
    rows = c.get("/performance.csv").text.splitlines()
    assert rows[0].startswith("model,class,n,sensitivity") and len(rows) == 2 + len(CLASSES)
    assert rows[1].split(",")[1] == "any_abnormality"


def test_drift_against_the_card_warns_when_a_site_images_differ(tmp_path, tiny_run, xray_paths):
    """A site whose machine exposes much darker than the validation data gets a plain drift warning."""
    import io
    import json

    from PIL import Image

    from model_training.release.reference import build
    from uplink_server.imaging import decode
    from uplink_server.model import Classifier

    ref = build(tiny_run / "model.onnx", progress=False)
    card = json.loads((tiny_run / "model_card.json").read_text())
    card["reference"] = ref
    clf = Classifier(tiny_run / "model.onnx", card=card)
    paths = [p for kind in ("kermany_normal", "kermany_pneumonia", "adult_normal", "covid") for p in xray_paths[kind]]
    with live_app(tmp_path / "d", classifier=clf) as (app, base):
        c, csrf = sign_in(base)
        auth = {"Authorization": f"Bearer {new_token(c, csrf)}"}
        for i in range(32):
            gray = decode(paths[i % len(paths)]).gray * 0.25  # a dark machine
            buf = io.BytesIO()
            Image.fromarray((gray * 255).astype("uint8")).save(buf, format="PNG")
            r = c.post("/api/v1/predict", files={"file": ("d.png", buf.getvalue(), "image/png")}, headers=auth)
            assert r.status_code in (200, 422)  # analysed, or refused by the model's gate: a case either way
        perf = c.get("/api/v1/performance", headers=auth).json()["by_model"][f"{clf.name} {clf.version}"]
        assert "image_mean" in perf["drift"]["large"] and perf["drift"]["stats"]["image_mean"]["n"] == 32
        page = c.get("/performance").text
        assert 'data-testid="drift-warning"' in page and 'data-testid="drift-plot"' in page
        assert "above 0.25, 32 images" in page and "at least 30 images" in page  # the rule, stated


@pytest.fixture()
def split_site(tmp_path, tiny_model, xray_paths):
    """The tiny real model with a triage threshold at the median score of ten real films (the card's operating
    point, set so that it passes some and flags others), and those films analysed in a web app."""
    import copy
    import json

    from uplink_server.model import Classifier, find_card

    images = [p for kind in ("covid", "kermany_pneumonia", "kermany_normal", "adult_normal") for p in xray_paths[kind]][:10]
    plain = Classifier(tiny_model)
    scores = [1 - plain.predict(p).probabilities["normal"] for p in images]
    card = copy.deepcopy(json.loads(find_card(tiny_model).read_text()))
    card["triage"] = {"threshold": float(np.median(scores)), "target_sensitivity": 0.95}
    with live_app(tmp_path / "data", classifier=Classifier(tiny_model, card=card)) as (app, base):
        c, csrf = sign_in(base)
        auth = {"Authorization": f"Bearer {new_token(c, csrf)}"}
        ids = [c.post("/api/v1/predict", files={"file": (p.name, p.read_bytes(), "image/jpeg")}, headers=auth).json()["case_id"]
               for p in images]
        yield c, auth, ids


def test_an_other_finding_the_ai_let_through_is_a_missed_film_and_small_numbers_say_so(split_site):
    """A doctor's "other finding" on a film the AI passed as no abnormality is a triage miss; at n = 3 the page
    shows counts, their interval and "too few cases yet" rather than alarms."""
    c, auth, ids = split_site
    cases = {x["id"]: x for x in c.get("/api/v1/cases", headers=auth).json()}
    passed = [i for i in ids if cases[i]["triage"]["needs_read"] is False]
    flagged = [i for i in ids if cases[i]["triage"]["needs_read"] is True]
    assert passed and flagged, "the tiny model passes some films and flags others"
    assert _review(c, auth, passed[0], "other", note="cavity, right apex").status_code == 201
    assert _review(c, auth, flagged[0], "other").status_code == 201
    third = next(i for i in ids if i not in (passed[0], flagged[0]))
    assert _review(c, auth, third, "not_assessable").status_code == 201  # says nothing about triage
    m = next(iter(c.get("/api/v1/performance", headers=auth).json()["by_model"].values()))
    tr = m["triage"]
    assert tr["abnormal"] == 2 and tr["missed"] == 1 and (tr["sensitivity_k"], tr["sensitivity_n"]) == (1, 2)
    assert tr["sensitivity_enough"] is False and tr["n"] == 2
    other_row = m["confusion_matrix"][m["readings"].index("other")]
    assert sum(other_row) == 2 and other_row[CLASSES.index(cases[passed[0]]["label"])] >= 1
    assert m["agreement"] == 0  # an other finding never agrees with a class
    page = c.get("/performance").text
    assert 'data-testid="site-triage"' in page and 'data-testid="too-few"' in page and "1/2" in page
    assert "too few cases yet (2 of 20 needed)" in page and 'data-testid="performance-warning"' not in page
    es = c.get("/performance", headers={"Accept-Language": "es"}).text
    assert "IC 95%" in es and "\\ IA" in es and "95% CI" not in es and "\\ AI" not in es


def test_drift_on_a_handful_of_images_says_too_few_and_fires_from_the_minimum():
    """The same shift is 'too few yet' on 5 images and a warning on 40, and both carry the rule's numbers."""
    from uplink_server import drift

    rng = np.random.default_rng(0)
    ref = drift.reference({"image_mean": rng.normal(0.5, 0.05, 500).tolist()})
    dark = lambda n: {"image_mean": rng.normal(0.2, 0.05, n).tolist()}  # noqa: E731
    few, many = drift.compare(ref, dark(5)), drift.compare(ref, dark(40))
    assert few["stats"]["image_mean"]["psi"] > drift.LARGE and many["stats"]["image_mean"]["psi"] > drift.LARGE
    assert few["too_few"] == ["image_mean"] and few["large"] == []
    assert many["large"] == ["image_mean"] and many["too_few"] == []
    assert few["threshold"] == many["threshold"] == drift.LARGE and few["min_n"] == 30
    same = drift.compare(ref, {"image_mean": rng.normal(0.5, 0.05, 40).tolist()})
    assert same["large"] == same["too_few"] == []
