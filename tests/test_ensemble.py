"""model_training ensemble: two real runs on one split, merged into one ONNX file the server loads like any other."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from model_training.cli import main  # noqa: E402
from model_training.release.ensemble import WEIGHT_BUDGET_BYTES  # noqa: E402


def _outputs(path: Path, x: np.ndarray) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))


def test_ensemble_averages_its_members_in_one_smaller_file(tiny_run, second_run, ensemble_run, xray_paths):
    from uplink_server.imaging import decode
    from uplink_server.preprocessing import PreprocessSpec, preprocess

    x = np.stack([preprocess(decode(p).gray, PreprocessSpec(size=(64, 64)))
                  for p in xray_paths["covid"] + xray_paths["kermany_pneumonia"]])
    a, b = _outputs(tiny_run / "model.onnx", x), _outputs(second_run / "model.onnx", x)
    got = _outputs(ensemble_run / "model.onnx", x)
    assert not np.allclose(a["logits"], b["logits"], atol=1e-3)  # two different models, or the test proves nothing
    scale = np.abs(a["logits"]).max() + np.abs(b["logits"]).max()
    np.testing.assert_allclose(got["logits"], (a["logits"] + b["logits"]) / 2, atol=1e-3 * scale)
    np.testing.assert_allclose(got["cam"], (a["cam"] + b["cam"]) / 2, atol=2e-3 * max(1.0, np.abs(got["cam"]).max()))
    np.testing.assert_allclose(got["embedding"], np.concatenate([a["embedding"], b["embedding"]], 1),
                               atol=2e-3 * max(1.0, np.abs(got["embedding"]).max()))
    # the weights nearest the output stored as float16: under the budget, though two members are over it
    size = (ensemble_run / "model.onnx").stat().st_size
    assert (tiny_run / "model.onnx").stat().st_size + (second_run / "model.onnx").stat().st_size > WEIGHT_BUDGET_BYTES
    assert WEIGHT_BUDGET_BYTES * 0.9 < size < WEIGHT_BUDGET_BYTES + 100_000  # the graph itself is a few kB

    card = json.loads((ensemble_run / "model_card.json").read_text())
    assert [m["model"] for m in card["members"]] == [str(tiny_run / "model.onnx"), str(second_run / "model.onnx")]
    assert card["architecture"] == "efficientnet_lite0 + efficientnet_lite0"
    assert card["name"] == "cxr-ensemble-2" and len(card["training"]["member_histories"]) == 2  # runs of one day
    assert card["training"]["command"].startswith("python -m model_training ensemble --models")
    assert 0 < card["export"]["float16_weight_tensors"] < 60
    assert card["export"]["max_abs_probability_change_vs_float32"] < 0.01
    # calibrated on the shared validation split, evaluated on the shared test split
    assert card["calibration"]["temperature"] > 0 and set(card["metrics"]) == {"val", "test"}
    assert card["metrics"]["test"]["n"] == sum(1 for r in csv.DictReader(open(tiny_run / "splits.csv")) if r["split"] == "test")
    for f in ("ood.npz", "splits.csv", "metrics.json", "learning_curves.png", "confusion_matrix.png", "roc.png", "model_card.md"):
        assert (ensemble_run / f).is_file(), f


def test_ensemble_serves_and_evaluates_like_one_model(ensemble_run, xray_paths, capsys):
    from uplink_server.model import Classifier

    clf = Classifier(ensemble_run / "model.onnx")
    assert clf.gate is not None and clf.gate.emb_ref.shape[1] == 2 * 1280  # refitted on both members' features
    pred = clf.predict(xray_paths["covid"][0])
    assert not pred.refused and pred.label in clf.classes and pred.heatmap is not None
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5
    # evaluate reproduces the card's test numbers from the file alone
    assert main(["evaluate", "--model", str(ensemble_run / "model.onnx"), "--data", str(ensemble_run / "splits.csv"),
                 "--split", "test", "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    card = json.loads((ensemble_run / "model_card.json").read_text())
    assert res["accuracy"] == pytest.approx(card["metrics"]["test"]["accuracy"])
    assert res["loss"] == pytest.approx(card["metrics"]["test"]["loss"], abs=1e-5)


def test_int8_ensemble_keeps_each_members_edges_float(ensemble_run, tmp_path):
    import onnx

    from model_training.release.ensemble import ensemble_members
    from model_training.release.quantize import FLOAT_TAIL_CONVS, calibration_images, method

    from .test_training import _int8_weights

    out = tmp_path / "ens.int8.onnx"
    assert main(["quantize", "--model", str(ensemble_run / "model.onnx"), "--data", str(ensemble_run / "splits.csv"),
                 "--out", str(out), "--images", "8", "--float-head-convs", "2"]) == 0
    graph = onnx.load(str(out)).graph
    weights = _int8_weights(graph)
    for member in ("m0/", "m1/"):
        convs = [n.name for n in graph.node if n.op_type == "Conv" and n.name.startswith(member)]
        floats = [c for c in convs if weights[c] is None]
        assert floats == convs[:2] + convs[-FLOAT_TAIL_CONVS:], member
    assert not out.with_suffix(".fp32.onnx").exists()  # the temporary float32 copy is cleaned up
    # percentile calibration holds every activation in memory: an ensemble of two gets half the images each
    assert ensemble_members(ensemble_run / "model.onnx") == 2 and calibration_images(200, 2) == 100
    assert "on 100 training images" in method(13, 2) and "convolutions of each member" in method(13, 2)


def test_members_on_other_splits_or_classes_are_refused(tiny_run, second_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(second_run, other)
    rows = list(csv.DictReader(open(other / "splits.csv")))
    moved = next(r for r in rows if r["split"] == "val")
    moved["split"] = "train"  # one validation image became a training image of this member
    with open(other / "splits.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert main(["ensemble", "--models", str(tiny_run / "model.onnx"), str(other / "model.onnx"),
                 "--out", str(tmp_path / "e1")]) == 2
    assert "another split" in capsys.readouterr().err and not (tmp_path / "e1").exists()

    shutil.copy(second_run / "splits.csv", other / "splits.csv")
    card = json.loads((other / "model_card.json").read_text())
    card["classes"] = list(reversed(card["classes"]))
    (other / "model_card.json").write_text(json.dumps(card))
    assert main(["ensemble", "--models", str(tiny_run / "model.onnx"), str(other / "model.onnx"),
                 "--out", str(tmp_path / "e2")]) == 2
    assert "other classes or preprocessing" in capsys.readouterr().err

    assert main(["ensemble", "--models", str(tiny_run / "model.onnx"), "--out", str(tmp_path / "e3")]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["ensemble", "--models", str(tiny_run / "model.onnx"), str(tmp_path / "nope.onnx"),
                 "--out", str(tmp_path / "e4")]) == 2
    assert "nope.onnx not found" in capsys.readouterr().err


def test_unpack_gives_back_each_member_to_pair_with_a_new_model(tiny_run, second_run, ensemble_run, xray_paths,
                                                                 tmp_path, capsys):
    from uplink_server.imaging import decode
    from uplink_server.model import Classifier
    from uplink_server.preprocessing import PreprocessSpec, preprocess

    x = np.stack([preprocess(decode(p).gray, PreprocessSpec(size=(64, 64))) for p in xray_paths["covid"]])
    assert main(["unpack", "--model", str(ensemble_run / "model.onnx"), "--out", str(tmp_path / "members")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "members" / m / "model.onnx") for m in ("m0", "m1")]
    for member, original in zip(printed, (tiny_run, second_run)):
        a, b = _outputs(Path(member), x), _outputs(original / "model.onnx", x)
        assert a.keys() == b.keys() and a["embedding"].shape == b["embedding"].shape
        for k in a:  # float16 storage of the tensors nearest the output is all that differs
            np.testing.assert_allclose(a[k], b[k], atol=4e-3 * max(1.0, np.abs(b[k]).max()))
        card = json.loads((Path(member).parent / "model_card.json").read_text())
        original_card = json.loads((original / "model_card.json").read_text())
        assert card["calibration"]["temperature"] == original_card["calibration"]["temperature"]
        assert card["training"]["command"] == original_card["training"]["command"]
        assert card["training"]["history"] == original_card["training"]["history"]
    # a member serves alone (without a refusal gate until fit-gate gives it one)
    pred = Classifier(printed[1]).predict(xray_paths["covid"][0])
    assert pred.label in ("normal", "pneumonia", "covid19") and pred.heatmap is not None

    # an ensemble is not a member: it would weigh its own members half; the error says what to do
    assert main(["ensemble", "--models", str(ensemble_run / "model.onnx"), str(second_run / "model.onnx"),
                 "--out", str(tmp_path / "nested")]) == 2
    assert "unpack" in capsys.readouterr().err and not (tmp_path / "nested").exists()
    # the unpacked members merge again, with the second run standing in for a newly trained model
    assert main(["ensemble", "--models", printed[0], str(second_run / "model.onnx"), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    np.testing.assert_allclose(_outputs(tmp_path / "again" / "model.onnx", x)["logits"],
                               _outputs(ensemble_run / "model.onnx", x)["logits"], atol=2e-3)
    # a single model has nothing to unpack
    assert main(["unpack", "--model", str(tiny_run / "model.onnx"), "--out", str(tmp_path / "single")]) == 2
    assert "not an ensemble" in capsys.readouterr().err
    assert main(["unpack", "--model", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "none")]) == 2
    assert "nope.onnx not found" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_a_model_without_its_splits_manifest_is_refused_by_name(tiny_run, second_run, tmp_path, capsys):
    """The manifest is found beside a run's model.onnx or a shipped <name>.onnx; without it, a clear error."""
    from benchmarks.bench_ood import held_out_xrays
    from model_training.data.datasets import DataError, load_spec, splits_beside, write_manifest

    assert splits_beside(tiny_run / "model.onnx") == tiny_run / "splits.csv"
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(tiny_run / "model.onnx", shipped / "tiny.onnx")
    shutil.copy(tiny_run / "model_card.json", shipped / "tiny.card.json")
    assert splits_beside(shipped / "tiny.onnx") is None
    with pytest.raises(DataError, match="no splits manifest beside it"):
        held_out_xrays(shipped / "tiny.onnx")
    assert main(["ensemble", "--models", str(shipped / "tiny.onnx"), str(second_run / "model.onnx"),
                 "--out", str(tmp_path / "e")]) == 2
    assert "needs its card and splits manifest beside it" in capsys.readouterr().err
    records = load_spec(str(tiny_run / "splits.csv"))
    write_manifest(records, shipped / "tiny.splits.csv")  # as release writes it: paths relative to the csv
    assert splits_beside(shipped / "tiny.onnx") == shipped / "tiny.splits.csv"
    test_paths = held_out_xrays(shipped / "tiny.onnx")
    assert test_paths and [Path(p).resolve() for p in test_paths] == [Path(r.path).resolve() for r in records
                                                                      if r.split == "test"]
