"""Adults and tuberculosis (model 2.0.0): the nih/ and tb/ sources, the fourth class, resolution made useless as
a cue, the triage operating point, and every consumer of the class list, with real films and tiny real models."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from model_training.data.labels import CLASSES, DISPLAY_NAMES, NORMAL, canonical_label

from .webapp_helpers import live_app, new_token, sign_in


def _films(data_root, name, label, n):
    with open(data_root / name / "labels.csv", newline="") as fh:
        return [data_root / name / r["path"] for r in csv.DictReader(fh) if r["label"] == label][:n]


@pytest.fixture(scope="session")
def adult_films(data_root):
    return {"nih_pneumonia": _films(data_root, "nih", "pneumonia", 4), "nih_normal": _films(data_root, "nih", "normal", 4),
            "tb": _films(data_root, "tb", "tuberculosis", 4), "tb_normal": _films(data_root, "tb", "normal", 4)}


# ---- data -------------------------------------------------------------------------------------------------

def test_tuberculosis_is_appended_to_the_one_class_list():
    assert CLASSES == ("normal", "pneumonia", "covid19", "tuberculosis")  # appended: older models' indices hold
    assert canonical_label("TB") == canonical_label("Tuberculosis") == "tuberculosis"
    assert DISPLAY_NAMES["tuberculosis"] == {"en": "Tuberculosis", "es": "Tuberculosis"}
    assert NORMAL == CLASSES[0]


def test_nih_and_tb_are_sources_with_patients(data_root):
    from model_training.data.datasets import load_spec
    from model_training.data.splits import check_patient_disjoint, make_splits

    nih, tb = load_spec("nih"), load_spec("tb")
    assert {r.label for r in nih} == {"normal", "pneumonia"} and {r.source for r in nih} == {"nih"}
    assert {r.label for r in tb} == {"normal", "tuberculosis"} and {r.source for r in tb} == {"tb"}
    assert all(r.age_group == "adult" and r.patient_id and r.license for r in nih + tb)
    # several NIH films share a patient: the split keeps each patient on one side
    assert len({r.patient_id for r in nih}) < len(nih)
    everything = load_spec("all")
    assert {r.source for r in everything} >= {"kermany", "radiography", "nih", "tb", "covid/ieee8023"}
    assert {r.label for r in everything} == set(CLASSES)
    split = make_splits(everything, 0.1, 0.15, seed=0)
    check_patient_disjoint(split)
    assert {r.label for r in split if r.split == "test" and r.source == "tb"} == {"normal", "tuberculosis"}


def test_leave_one_source_out_folds_include_nih_and_tb(data_root):
    from model_training.data.datasets import load_spec
    from model_training.evaluation.external import holdout_groups

    folds = holdout_groups(load_spec("all"))
    assert folds["nih"] == ["nih"] and folds["tb"] == ["tb"] and folds["kermany"] == ["kermany"]


# ---- resolution -------------------------------------------------------------------------------------------

def _detail_above_128px(x: np.ndarray) -> float:
    """Share of a 224 px film's variance that a reduction to 128 px (and back) removes: the detail finer than
    the TB programme's stored films can hold."""
    from model_training.data.augmentation import degrade_resolution

    return float(((x - degrade_resolution(x, 128 / 224)) ** 2).mean() / x.var())


def test_resolution_augmentation_covers_the_blur_of_the_128px_tb_films(adult_films):
    """Sharp films degraded in training span the detail of the TB programme's 128 px films, so blur cannot stand
    for tuberculosis; as stored, the sharp films have several times more fine detail."""
    from model_training.data.augmentation import LOWRES_P, PRESETS, Augmenter, degrade_resolution
    from uplink_server.imaging import decode
    from uplink_server.preprocessing import resize_gray

    size = (224, 224)
    tb = [_detail_above_128px(resize_gray(decode(p).gray, size)) for p in adult_films["tb"] + adult_films["tb_normal"]]
    sharp_films = [resize_gray(decode(p).gray, size) for p in adult_films["nih_normal"] + adult_films["nih_pneumonia"]]
    sharp = [_detail_above_128px(x) for x in sharp_films]
    assert np.median(sharp) > 1.5 * max(tb)  # as stored, blur tells the TB programme apart
    cfg = PRESETS["resolution"]
    only_lowres = type(cfg)(lowres=cfg.lowres)
    degraded = [_detail_above_128px(Augmenter(only_lowres, seed=s)(x)) for s in range(12) for x in sharp_films]
    assert min(degraded) < min(tb) and max(degraded) > max(tb)
    share_as_blurry = np.mean([d <= max(tb) for d in degraded])
    assert 0.25 < share_as_blurry < LOWRES_P, share_as_blurry
    assert np.array_equal(degrade_resolution(sharp_films[0], 1.0), sharp_films[0])


# ---- triage -----------------------------------------------------------------------------------------------

def test_triage_threshold_meets_the_sensitivity_in_every_source():
    from model_training.evaluation.triage import fit_triage, threshold_for_sensitivity

    rng = np.random.default_rng(0)
    n = 400
    labels = rng.integers(0, 4, n)
    sources = np.where(rng.random(n) < 0.5, "a", "b")
    # source b's abnormal films look less abnormal to the model: b sets the threshold
    p_normal = np.where(labels == 0, rng.beta(5, 2, n), np.where(sources == "a", rng.beta(1, 6, n), rng.beta(2, 3, n)))
    rest = (1 - p_normal)[:, None] * rng.dirichlet([1, 1, 1], n)
    probs = np.column_stack([p_normal, rest])
    rule = fit_triage(probs, labels, list(CLASSES), list(sources), 0.95)
    scores, abnormal = 1 - p_normal, labels != 0
    t = rule["threshold"]
    for s in ("a", "b"):
        m = abnormal & (sources == s)
        assert (scores[m] >= t).mean() >= 0.95
    assert rule["binding_source"] == "b"
    # the highest such threshold: any higher one misses the target in b
    higher = np.min(scores[abnormal & (sources == "b") & (scores > t + 1e-6)])
    assert (scores[abnormal & (sources == "b")] >= higher).mean() < 0.95
    assert rule["validation"]["by_source"]["b"]["sensitivity"] >= 0.95
    assert threshold_for_sensitivity(np.array([0.1, 0.2, 0.3, 0.4]), np.ones(4, bool), 0.75) == 0.2


def test_triage_rule_from_the_card_and_for_older_models():
    from uplink_server.triage import TriageRule

    old = TriageRule.from_card({"classes": ["normal", "pneumonia", "covid19"]})
    assert old.threshold is None
    assert old.assess({"normal": 0.6, "pneumonia": 0.3, "covid19": 0.1})["needs_read"] is False
    assert old.assess({"normal": 0.4, "pneumonia": 0.5, "covid19": 0.1})["needs_read"] is True
    new = TriageRule.from_card({"triage": {"threshold": 0.2, "target_sensitivity": 0.95}})
    # a film the model calls normal still needs a read when the abnormal share crosses the threshold
    r = new.assess({"normal": 0.7, "pneumonia": 0.1, "covid19": 0.05, "tuberculosis": 0.15})
    assert r["needs_read"] is True and abs(r["score"] - 0.3) < 1e-6
    assert new.assess({"pneumonia": 0.6, "covid19": 0.4}) is None  # no normal class: no triage


@pytest.fixture(scope="session")
def tiny_tb_run(tmp_path_factory, data_root):
    """A real 4-class model: one epoch on a few dozen films of every source at 64 px, with the resolution preset."""
    pytest.importorskip("torch")
    from model_training.cli import main

    out = tmp_path_factory.mktemp("tiny_tb_run")
    rc = main(["train", "--data", "all", "--arch", "efficientnet_lite0", "--pretrained", "imagenet", "--img-size", "64",
               "--epochs", "1", "--limit", "32", "--batch-size", "8", "--workers", "0", "--augment", "resolution",
               "--balance", "source", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def tb_classifier(tiny_tb_run):
    from model_training.cli import main
    from uplink_server.model import Classifier

    assert main(["triage", "--model", str(tiny_tb_run / "model.onnx"), "--write-card", "--no-progress"]) == 0
    return Classifier(tiny_tb_run / "model.onnx")


def test_four_class_model_serves_triage_and_a_heatmap_per_class(tb_classifier, tiny_tb_run, adult_films):
    card = json.loads((tiny_tb_run / "model_card.json").read_text())
    assert card["classes"] == list(CLASSES)
    t = card["triage"]
    assert tb_classifier.triage.threshold == t["threshold"] and t["target_sensitivity"] == 0.95
    assert t["validation"]["sensitivity"] >= 0.95
    assert "test split (held-out patients)" in t["held_out"]
    assert "## Triage" in (tiny_tb_run / "model_card.md").read_text()
    film = adult_films["tb"][0]
    pred = tb_classifier.predict(film)
    assert set(pred.probabilities) == set(CLASSES)
    score = 1 - pred.probabilities["normal"]
    assert pred.triage == {"score": pytest.approx(score, abs=1e-5), "needs_read": score >= t["threshold"],
                           "threshold": t["threshold"]}
    tb_map = tb_classifier.predict(film, heatmap_class="tuberculosis").heatmap
    assert tb_map.shape == pred.heatmap.shape
    with pytest.raises(ValueError, match="no class 'effusion'"):
        tb_classifier.predict(film, heatmap_class="effusion")


def test_cli_leads_with_triage(tiny_tb_run, tb_classifier, adult_films, capsys):
    from uplink_server.cli import main

    main(["predict", "--model", str(tiny_tb_run / "model.onnx"), str(adult_films["tb"][0])])
    out = capsys.readouterr().out
    assert ("NEEDS A DOCTOR'S READ" in out) or ("no abnormality found by the model" in out)
    main(["predict", "--model", str(tiny_tb_run / "model.onnx"), "--json", str(adult_films["tb"][0])])
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert set(res["triage"]) == {"score", "needs_read", "threshold"}


def test_refusal_gate_threshold_covers_every_source():
    """A source whose films sit further from the references (a 128 px programme) raises the threshold to its own
    99.5th percentile instead of being refused at several times the overall rate."""
    from uplink_server.ood import fit_gate

    rng = np.random.default_rng(1)
    centre = np.full(8, 1.0)
    ref = rng.normal(size=(300, 8)) * 0.3 + centre  # embeddings are compared by direction (cosine)
    near, far = rng.normal(size=(600, 8)) * 0.3 + centre, rng.normal(size=(300, 8)) * 0.6 + centre
    held = np.concatenate([near, far])
    thumbs_ref, thumbs_held = rng.normal(size=(300, 16)) + 2, rng.normal(size=(900, 16)) + 2
    groups = ["big"] * 600 + ["small"] * 300
    pooled = fit_gate(ref, thumbs_ref, held, thumbs_held)
    per_source = fit_gate(ref, thumbs_ref, held, thumbs_held, held_groups=groups)
    small = per_source.score(far, thumbs_held[600:])
    assert (small > pooled.threshold).mean() > 0.01 >= (small > per_source.threshold).mean()
    assert per_source.threshold >= pooled.threshold


# ---- the web app --------------------------------------------------------------------------------------------

def test_web_app_leads_with_triage_and_keeps_older_cases(tmp_path, tb_classifier, adult_films):
    from web_app.db import Case, User

    with live_app(tmp_path / "data", classifier=tb_classifier) as (app, base):
        c, csrf = sign_in(base)
        auth = {"Authorization": f"Bearer {new_token(c, csrf)}"}
        film = adult_films["tb"][1]
        r = c.post("/api/v1/predict", files={"file": (film.name, film.read_bytes(), "image/png")},
                   data={"patient_code": "TB-1"}, headers=auth)
        assert r.status_code == 200, r.text
        res = r.json()
        assert set(res["probabilities"]) == set(CLASSES)
        assert res["triage"]["needs_read"] == (res["risk"] >= tb_classifier.triage.threshold)
        assert res["triage"]["threshold"] == tb_classifier.triage.threshold
        new_id = res["case_id"]
        # a case stored by a 3-class model before 2.0.0: no triage columns, three probabilities
        with app.state.SessionLocal() as db:
            admin = db.query(User).first()
            old = Case(patient_code="OLD-1", created_by=admin.id, filename="old.png", status="done", label="pneumonia",
                       probabilities={"normal": 0.2, "pneumonia": 0.7, "covid19": 0.1}, risk=0.8,
                       model_name="cxr-screen", model_version="1.5.0")
            db.add(old)
            db.commit()
            old_id = old.id
        page = c.get(f"/cases/{new_id}").text
        lead = "Needs a doctor&#39;s read" if res["triage"]["needs_read"] else "No abnormality found by the model"
        assert lead in page.split('data-testid="outcome"')[0]  # triage first, the finding under it
        assert "Tuberculosis" in page and "the model card&#39;s threshold" in page
        old_page = c.get(f"/cases/{old_id}").text
        assert "Needs a doctor&#39;s read" in old_page and "this model has no triage threshold" in old_page
        es = c.get(f"/cases/{new_id}", headers={"Accept-Language": "es"})
        assert es.status_code == 200
        work = c.get("/worklist").text
        assert f'data-testid="row-{old_id}"' in work and f'data-testid="row-{new_id}"' in work
        assert "Needs read" in work
        cases = {x["id"]: x for x in c.get("/api/v1/cases", headers=auth).json()}
        assert cases[old_id]["triage"]["needs_read"] is True and cases[old_id]["triage"]["threshold"] is None
        exported = list(csv.DictReader(io.StringIO(c.get("/export.csv").text)))
        assert "p_tuberculosis" in exported[0] and "needs_read" in exported[0]
        row_old = next(x for x in exported if x["id"] == str(old_id))
        assert row_old["p_tuberculosis"] == "" and row_old["needs_read"] == "yes"
        assert "Tuberculosis" in c.get(f"/cases/{new_id}/report").text or res["label"] != "tuberculosis"
        assert c.get(f"/cases/{old_id}/report").status_code == 200
        # a doctor can read a film as tuberculosis; the performance page takes both model versions
        rv = c.post(f"/api/v1/cases/{new_id}/review", json={"reading": "tuberculosis", "agrees": res["label"] == "tuberculosis"},
                    headers=auth)
        assert rv.status_code == 201 and rv.json()["review"]["reading"] == "tuberculosis", rv.text
        c.post(f"/api/v1/cases/{old_id}/review", json={"reading": "tuberculosis", "agrees": False}, headers=auth)
        perf = c.get("/api/v1/performance", headers=auth)
        assert perf.status_code == 200
        assert c.get("/performance").status_code == 200
