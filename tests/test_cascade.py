"""An ensemble served as a cascade (uplink_server.cascade, model_training release-cascade), on a tiny real ensemble."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from model_training.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def shipped(ensemble_run, tmp_path_factory) -> Path:
    """The tiny ensemble released as a weights folder: tiny.onnx, its card, splits and gate."""
    from model_training.release.release import release

    out = tmp_path_factory.mktemp("shipped")
    release(ensemble_run, "tiny", out, "0.0.1", quantize=False, progress=False)
    return out


@pytest.fixture(scope="module")
def unseen(tmp_path_factory) -> Path:
    """A few films of each class of two hospitals the tiny models never saw, as a manifest."""
    from model_training.data.datasets import load_spec, write_manifest

    picked = []
    for source in ("nih", "tb"):
        recs = sorted(load_spec(source), key=lambda r: r.path)
        for label in sorted({r.label for r in recs}):
            picked += [r for r in recs if r.label == label][:6]
    path = tmp_path_factory.mktemp("unseen") / "unseen.csv"
    write_manifest(picked, path)
    return path


def _copy(shipped: Path, out: Path) -> Path:
    """The weights folder elsewhere, its splits manifest rewritten for the new place (paths are relative to it)."""
    from model_training.data.datasets import load_spec, write_manifest

    shutil.copytree(shipped, out)
    write_manifest(load_spec(str(shipped / "tiny.splits.csv")), out / "tiny.splits.csv")
    return out


@pytest.fixture(scope="module")
def members(shipped, tmp_path_factory) -> Path:
    """A copy of the shipped ensemble with its members and the first network's refusal gate beside it."""
    from model_training.data.datasets import load_spec
    from model_training.data.splits import split_records
    from model_training.release.cascade import write_members
    from model_training.release.gate import fit_ood_gate
    from uplink_server.model import Classifier

    out = _copy(shipped, tmp_path_factory.mktemp("members") / "w")
    paths = write_members(out / "tiny.onnx", out, "tiny")
    spec = Classifier(out / "tiny.onnx").spec
    fit_ood_gate(paths[0], spec, split_records(load_spec(str(out / "tiny.splits.csv")))).save(out / "tiny.cascade.ood.npz")
    return out


def _gate(folder: Path):
    from uplink_server import ood
    from uplink_server.cascade import CascadeGate

    return CascadeGate(ood.XrayGate.load(folder / "tiny.cascade.ood.npz"), ood.XrayGate.load(folder / "tiny.ood.npz"))


def _ship_cascade(members: Path, out: Path) -> dict:
    """A copy of ``members`` whose card ships a cascade with exit probability 0 (every film the first network's);
    returns the card."""
    _copy(members, out)
    card = json.loads((out / "tiny.card.json").read_text())
    card["cascade"] = {"members": ["tiny.m0.onnx", "tiny.m1.onnx"], "first_temperature": card["members"][0]["temperature"],
                       "exit_probability": 0.0, "ood": {"file": "tiny.cascade.ood.npz"}, "shipped": True}
    (out / "tiny.card.json").write_text(json.dumps(card))
    return card


def _films(xray_paths, size: int = 64) -> np.ndarray:
    from uplink_server.imaging import decode
    from uplink_server.preprocessing import PreprocessSpec, preprocess

    paths = xray_paths["covid"] + xray_paths["kermany_pneumonia"] + xray_paths["kermany_normal"]
    return np.stack([preprocess(decode(p).gray, PreprocessSpec(size=(size, size))) for p in paths])


def _run(path: Path, x: np.ndarray) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))


def test_members_are_written_as_the_ensemble_stored_them(shipped, members, xray_paths):
    paths = [members / "tiny.m0.onnx", members / "tiny.m1.onnx"]
    x = _films(xray_paths)
    merged, a, b = _run(shipped / "tiny.onnx", x), _run(paths[0], x), _run(paths[1], x)
    assert not np.allclose(a["logits"], b["logits"], atol=1e-3)
    # the same weights (float16 where the ensemble had float16), so "both networks" is the merged file's answer
    np.testing.assert_allclose((a["logits"] + b["logits"]) / 2, merged["logits"], atol=1e-5)
    np.testing.assert_allclose((a["cam"] + b["cam"]) / 2, merged["cam"], atol=1e-5)
    np.testing.assert_allclose(np.concatenate([a["embedding"], b["embedding"]], 1), merged["embedding"], atol=1e-5)
    assert sum(p.stat().st_size for p in paths) < 1.05 * (shipped / "tiny.onnx").stat().st_size


def test_the_first_network_answers_alone_only_when_sure(shipped, members, xray_paths):
    from uplink_server.cascade import CascadeBackend, CascadeRule, softmax

    paths = [members / "tiny.m0.onnx", members / "tiny.m1.onnx"]
    card = json.loads((shipped / "tiny.card.json").read_text())
    t0, te = card["members"][0]["temperature"], card["calibration"]["temperature"]
    x = _films(xray_paths)
    merged, first = _run(shipped / "tiny.onnx", x), _run(paths[0], x)
    gate = _gate(members)
    sure = softmax(first["logits"] / t0).max(axis=1)
    tau = float(np.median(sure))  # half the films each way
    backend = CascadeBackend(paths, CascadeRule(tau, t0, te), gate, threads=1)
    logits, cam, emb = backend(x)
    alone = sure >= tau
    assert 0 < alone.sum() < len(x)
    # alone: the first network's own calibrated answer once the Classifier applies the ensemble's temperature
    np.testing.assert_allclose(softmax(logits[alone] / te), softmax(first["logits"][alone] / t0), atol=1e-6)
    np.testing.assert_allclose(cam[alone], first["cam"][alone], atol=1e-6)
    # the others: the ensemble's answer and embedding; the first network's alone leave the rest unknown
    np.testing.assert_allclose(logits[~alone], merged["logits"][~alone], atol=1e-5)
    np.testing.assert_allclose(cam[~alone], merged["cam"][~alone], atol=1e-5)
    np.testing.assert_allclose(emb[~alone], merged["embedding"][~alone], atol=1e-5)
    np.testing.assert_allclose(emb[alone, :1280], first["embedding"][alone], atol=1e-6)
    assert np.isnan(emb[alone, 1280:]).all()
    assert backend.status()["answered_by_first_network_alone"] == int(alone.sum())
    # never sure: the ensemble for every film; a batch of one takes the same path as in the batch
    never = CascadeBackend(paths, CascadeRule(1.01, t0, te), gate, threads=1)
    np.testing.assert_allclose(never(x)[0], merged["logits"], atol=1e-5)
    np.testing.assert_allclose(backend(x[:1])[0], logits[:1], atol=1e-5)
    # films far from the X-rays the first network's gate knows go to both networks, however sure it is
    distance = gate.distance(first["embedding"])
    doubt = float(np.median(distance))
    wary = CascadeBackend(paths, CascadeRule(0.0, t0, te, doubt), gate, threads=1)
    far = distance > doubt
    assert 0 < far.sum() < len(x)
    np.testing.assert_allclose(wary(x)[0][far], merged["logits"][far], atol=1e-5)
    assert wary.status()["answered_by_first_network_alone"] == int((~far).sum())


def test_the_cascades_gate_refuses_what_each_path_would(members, xray_paths):
    """A film only the first network saw is scored by its gate (scaled to the ensemble gate's threshold), one that
    every network saw by the ensemble's gate."""
    from uplink_server import ood
    from uplink_server.imaging import decode

    gate = _gate(members)
    x = _films(xray_paths)
    paths = xray_paths["covid"] + xray_paths["kermany_pneumonia"] + xray_paths["kermany_normal"]
    thumbs = np.stack([ood.thumbnail(decode(p).gray) for p in paths])
    e0, e1 = _run(members / "tiny.m0.onnx", x)["embedding"], _run(members / "tiny.m1.onnx", x)["embedding"]
    mixed = np.concatenate([e0, e1], 1)
    mixed[::2, 1280:] = np.nan
    got = gate.score(mixed, thumbs)
    first_alone = gate.first.score(e0[::2], thumbs[::2])
    np.testing.assert_allclose(got[::2], first_alone * gate.whole.threshold / gate.first.threshold, rtol=1e-5)
    np.testing.assert_allclose(got[1::2], gate.whole.score(np.concatenate([e0, e1], 1)[1::2], thumbs[1::2]), rtol=1e-5)
    assert ((got[::2] > gate.threshold) == (first_alone > gate.first.threshold)).all()


def test_the_exit_probability_is_the_lowest_that_keeps_the_ensembles_answers():
    from model_training.release.cascade import AGREEMENT, choose_exit

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    second = np.eye(3)[y] * 6.0 + rng.normal(0, 0.3, (2000, 3))  # a sure, right network
    first = np.eye(3)[y] * 6.0 + rng.normal(0, 0.3, (2000, 3))  # as sure where it is right
    wrong = np.arange(100)  # the first network is sure of another class here, but less sure than elsewhere
    first[wrong] = np.eye(3)[(y[wrong] + 1) % 3] * 2.2
    choice = choose_exit([first, second], y, 1.0, 1.0)
    tau = choice["exit_probability"]
    assert choice["validation"]["agreement_with_ensemble"] >= AGREEMENT
    below = [r for r in choice["grid"] if r["exit_probability"] < tau]
    assert below and all(r["agreement_with_ensemble"] < AGREEMENT or r["nll_increase"] > 0.005 for r in below)
    # every film the first network is right and sure of leaves early; the 5 % it is wrong about do not
    assert choice["validation"]["share_alone"] == pytest.approx(1 - len(wrong) / len(y), abs=0.005)
    # a first network surer of its wrong answers than of any right one: no exit keeps the ensemble's answers
    first[wrong] = np.eye(3)[(y[wrong] + 1) % 3] * 30.0
    assert choose_exit([first, second], y, 1.0, 1.0)["exit_probability"] is None


def test_release_cascade_judges_it_against_the_ensemble_and_serves_what_it_keeps(shipped, unseen, tmp_path, capsys):
    from uplink_server.model import Classifier

    out = _copy(shipped, tmp_path / "w")
    assert main(["release-cascade", "--name", "tiny", "--out", str(out), "--unseen", str(unseen), "--no-progress"]) == 0
    text = capsys.readouterr().out
    printed = json.loads(text[text.index('{\n  "shipped"'):])
    card = json.loads((out / "tiny.card.json").read_text())
    c = card["cascade"]
    assert c["chosen_on"] == "validation split" and c["validation"]["agreement_with_ensemble"] >= 0.999
    checks = c["parity"]
    assert any("unseen nih" in line for line in checks) and any("unseen tb" in line for line in checks)
    assert c["shipped"] == (not any(line.endswith(": fails") for line in checks))
    files = [out / "tiny.m0.onnx", out / "tiny.m1.onnx", out / "tiny.cascade.ood.npz"]
    assert all(f.is_file() == c["shipped"] for f in files)
    assert "## Served as a cascade" in (out / "tiny.card.md").read_text()
    assert (Classifier(out / "tiny.onnx").cascade is not None) == c["shipped"]
    assert printed["shipped"] == c["shipped"] and printed["exit_probability"] == c["exit_probability"]


def test_release_cascade_refuses_what_has_no_cascade_to_serve(tiny_run, tmp_path, capsys):
    """A folder without the shipped model, or a single network: a clear error, nothing written."""
    from model_training.release.release import release

    assert main(["release-cascade", "--name", "tiny", "--out", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "no shipped model 'tiny'" in capsys.readouterr().err
    single = tmp_path / "single"
    release(tiny_run, "tiny", single, "0.0.1", quantize=False, progress=False)
    files_before = sorted(f.name for f in single.iterdir())
    assert main(["release-cascade", "--name", "tiny", "--out", str(single), "--no-progress"]) == 2
    assert "is not an ensemble" in capsys.readouterr().err
    assert sorted(f.name for f in single.iterdir()) == files_before


def test_a_release_cascade_that_stops_half_way_leaves_the_weights_as_they_were(shipped, tmp_path, capsys):
    """Judging against sources the ensemble was trained on is refused after the members are written: the card
    and the folder are left as they were, so nothing unjudged is served."""
    from uplink_server.model import Classifier

    out = _copy(shipped, tmp_path / "w")
    card_before = (out / "tiny.card.json").read_text()
    files_before = sorted(f.name for f in out.iterdir())
    assert main(["release-cascade", "--name", "tiny", "--out", str(out), "--unseen", str(out / "tiny.splits.csv"),
                 "--no-progress"]) == 2
    assert "not held out" in capsys.readouterr().err
    assert (out / "tiny.card.json").read_text() == card_before
    assert sorted(f.name for f in out.iterdir()) == files_before
    assert Classifier(out / "tiny.onnx").cascade is None


def test_a_shipped_cascade_serves_by_default_and_the_full_ensemble_on_request(members, tmp_path, xray_paths,
                                                                               monkeypatch, capsys):
    from uplink_server.cascade import CascadeGate
    from uplink_server.cli import main as server_main
    from uplink_server.model import Classifier

    out = tmp_path / "w"
    card = _ship_cascade(members, out)

    clf = Classifier(out / "tiny.onnx")
    assert clf.cascade is not None and isinstance(clf.gate, CascadeGate)
    pred = clf.predict(xray_paths["covid"][0])
    bare = {k: card[k] for k in ("classes", "preprocessing", "outputs")}
    first = Classifier(out / "tiny.m0.onnx", card={**bare, "calibration": {"temperature": card["members"][0]["temperature"]}})
    alone = first.predict(xray_paths["covid"][0], check_ood=False)
    assert not pred.refused and pred.heatmap is not None and pred.ood_score is not None
    for k, v in alone.probabilities.items():  # exit probability 0, no doubt limit: every film is the first network's
        assert pred.probabilities[k] == pytest.approx(v, abs=1e-5)
    assert clf.cascade.status()["answered_by_first_network_alone"] == 1
    # a copy of the card whose temperature was changed since (made underconfident, as the recalibration tests do):
    # the first network's answers follow it as the ensemble's would
    t = card["calibration"]["temperature"]
    hotter = {**card, "calibration": {**card["calibration"], "temperature": 4 * t},
              "cascade": {**card["cascade"], "ensemble_temperature": t}}
    pred4 = Classifier(out / "tiny.onnx", card=hotter).predict(xray_paths["covid"][0])
    alone4 = Classifier(out / "tiny.m0.onnx", card={**bare, "calibration": {"temperature": 4 * card["members"][0]["temperature"]}}
                        ).predict(xray_paths["covid"][0], check_ood=False)
    for k, v in alone4.probabilities.items():
        assert pred4.probabilities[k] == pytest.approx(v, abs=1e-5)
    assert max(pred4.probabilities.values()) < max(pred.probabilities.values())

    capsys.readouterr()
    assert server_main(["info", "--model", str(out / "tiny.onnx")]) == 0
    info = json.loads(capsys.readouterr().out)["cascade"]  # what an operator checks before serving
    assert info["exit_probability"] == 0.0 and [Path(m).name for m in info["members"]] == ["tiny.m0.onnx", "tiny.m1.onnx"]

    monkeypatch.setenv("CXR_CASCADE", "0")
    assert server_main(["info", "--model", str(out / "tiny.onnx")]) == 0
    assert json.loads(capsys.readouterr().out)["cascade"] is None
    whole = Classifier(out / "tiny.onnx")
    assert whole.cascade is None and whole.gate.emb_ref.shape[1] == 2 * 1280
    monkeypatch.delenv("CXR_CASCADE")
    assert Classifier(out / "tiny.onnx", cascade=False).cascade is None

    (out / "tiny.m1.onnx").unlink()  # a copy of weights/ without the member files: the ensemble serves, with a warning
    with pytest.warns(UserWarning, match="tiny.m1.onnx is missing"):
        partial = Classifier(out / "tiny.onnx")
    assert partial.cascade is None and not partial.predict(xray_paths["covid"][0]).refused


def test_the_admin_page_shows_how_many_films_the_first_network_answered_alone(members, tmp_path, xray_paths):
    """An operator sees the cascade at work on the admin page (and in /healthz): the share of films answered by
    the first network alone, here every one (exit probability 0)."""
    from uplink_server.model import Classifier

    from .webapp_helpers import live_app, new_token, sign_in

    out = tmp_path / "w"
    _ship_cascade(members, out)
    with live_app(tmp_path / "d", classifier=Classifier(out / "tiny.onnx")) as (app, base):
        c, csrf = sign_in(base)
        assert "answered by the first network alone" not in c.get("/admin").text  # nothing served yet
        auth = {"Authorization": f"Bearer {new_token(c, csrf)}"}
        film = xray_paths["covid"][0]
        assert c.post("/api/v1/predict", files={"file": (film.name, film.read_bytes(), "image/jpeg")},
                      headers=auth).status_code == 200
        assert "answered by the first network alone 100 %" in c.get("/admin").text
        assert c.get("/healthz").json()["local"]["batching"]["cascade"]["answered_by_first_network_alone"] == 1
