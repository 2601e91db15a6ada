"""The model server on real images: CLI, heatmaps, refusals, Anvil functions, uplink."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from uplink_server.cli import main

from .conftest import subprocess_env


def test_predict_real_xrays(classifier, xray_paths):
    for p in xray_paths["covid"][:2] + xray_paths["kermany_pneumonia"][:2]:
        pred = classifier.predict(p, check_ood=False)
        assert not pred.refused, pred.refusal
        assert pred.label in classifier.classes
        assert abs(sum(pred.probabilities.values()) - 1) < 1e-5
        assert pred.model == classifier.name and pred.elapsed_ms > 0


def test_calibration_temperature_applied(classifier, one_xray):
    from uplink_server.imaging import decode

    x = classifier.preprocess(decode(one_xray))[None]
    logits = classifier.run(x)[0]
    t = classifier.temperature
    z = logits[0] / t
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    got = classifier.predict(one_xray, check_ood=False).probabilities
    assert np.allclose(list(got.values()), expected, atol=1e-6)


def test_uncertain_when_below_threshold(tiny_model, one_xray):
    from uplink_server.model import Classifier
    from uplink_server.uncertainty import UncertaintyRule

    clf = Classifier(tiny_model)
    clf.uncertainty = UncertaintyRule("top_probability", 1.01)  # nothing is that sure
    assert clf.predict(one_xray, check_ood=False).uncertain is True
    clf.uncertainty = UncertaintyRule("top_probability", 0.0)
    pred = clf.predict(one_xray, check_ood=False)
    assert pred.uncertain is False
    top = sorted(pred.probabilities.values(), reverse=True)
    assert abs(pred.margin - (top[0] - top[1])) < 1e-9
    clf.uncertainty = UncertaintyRule("margin", pred.margin + 0.01)  # a near tie by the card's margin rule
    assert clf.predict(one_xray, check_ood=False).uncertain is True
    clf.uncertainty = UncertaintyRule("margin", pred.margin - 0.01)
    assert clf.predict(one_xray, check_ood=False).uncertain is False
    with pytest.raises(ValueError):
        UncertaintyRule.from_card({"uncertainty": {"rule": "vibes", "threshold": 1}})


def test_margin_rule_is_chosen_on_validation_like_data():
    import numpy as np

    from model_training.evaluation.uncertainty import fit_margin_rule

    rng = np.random.default_rng(0)
    # 200 confident right answers, 20 near ties of which half are wrong
    sure = np.tile([0.9, 0.06, 0.04], (200, 1))
    ties = np.tile([0.48, 0.44, 0.08], (20, 1))
    labels = np.r_[np.zeros(200, int), np.where(rng.permutation(20) < 10, 1, 0)]
    rule = fit_margin_rule(np.r_[sure, ties], labels, target_error=0.02)
    assert 0.04 < rule["threshold"] <= 0.84  # flags the ties, not the sure ones
    assert rule["validation"]["share_uncertain"] == round(20 / 220, 4) and rule["validation"]["error_confident"] == 0.0
    with pytest.raises(ValueError):
        fit_margin_rule(sure, np.zeros(200, int), target_error=1.5)


def test_heatmap_is_informative_and_input_dependent(classifier, xray_paths):
    a = classifier.predict(xray_paths["covid"][0], check_ood=False)
    b = classifier.predict(xray_paths["kermany_normal"][1], check_ood=False)
    assert a.heatmap is not None and a.heatmap.std() > 0.05  # not uniform
    assert a.heatmap.min() >= 0 and a.heatmap.max() <= 1
    assert not np.allclose(a.heatmap, b.heatmap)
    img = Image.open(io.BytesIO(a.heatmap_png))
    assert img.format == "PNG" and img.mode == "RGB"


def test_cli_json_and_heatmap_files(tiny_model, xray_paths, tmp_path, capsys):
    files = [str(p) for p in xray_paths["kermany_normal"][:2]]
    rc = main(["predict", *files, "--model", str(tiny_model), "--json", "--no-ood", "--heatmap", str(tmp_path / "h.png")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["results"]) == 2 and "not a diagnosis" in out["notice"]
    for r in out["results"]:
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5 and r["model"] and r["version"]
        assert Image.open(r["heatmap"]).size[0] > 0


def test_cli_refusal_sets_exit_code(tiny_model, one_xray, tmp_path, capsys):
    txt = tmp_path / "notes.txt"
    txt.write_text("not an x-ray")
    rc = main(["predict", str(one_xray), str(txt), "--model", str(tiny_model), "--no-ood"])
    out = capsys.readouterr().out
    assert rc == 1 and "REFUSED (not_an_image)" in out and "not a diagnosis" in out


def test_batch_matches_one_by_one_and_refuses_only_bad_files(classifier, xray_paths, tmp_path, capsys):
    from uplink_server.model import Classifier

    files = [str(p) for p in xray_paths["covid"][:3] + xray_paths["kermany_normal"][:3]]
    bad = tmp_path / "cut.jpeg"
    bad.write_bytes(xray_paths["covid"][0].read_bytes()[:300])
    clf = Classifier(classifier.path, threads=2)  # two worker sessions share the batch
    batch = clf.predict_batch(files[:3] + [str(bad)] + files[3:], check_ood=False)
    assert batch[3].refused and batch[3].refusal["code"] == "corrupt_image"
    for f, b in zip(files, batch[:3] + batch[4:]):
        one = classifier.predict(f, check_ood=False)
        assert not b.refused and b.label == one.label
        assert np.allclose(list(b.probabilities.values()), list(one.probabilities.values()), atol=1e-5)
        assert np.allclose(b.heatmap, one.heatmap, atol=1e-4)
    # the CLI batches files; a missing one and a corrupt one are reported, the rest classified
    rc = main(["predict", files[0], str(tmp_path / "gone.png"), str(bad), files[1], "--model", str(classifier.path),
               "--json", "--no-ood"])
    out = json.loads(capsys.readouterr().out)["results"]
    assert rc == 1 and [r["refused"] for r in out] == [False, True, True, False]
    assert out[1]["refusal"]["code"] == "not_found" and out[2]["refusal"]["code"] == "corrupt_image"


def test_cli_missing_model(tmp_path, one_xray, capsys):
    assert main(["predict", str(one_xray), "--model", str(tmp_path / "x.onnx")]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_truncated_model_file_is_a_clear_error_everywhere_it_is_loaded(tmp_path, tiny_run, one_xray, capsys):
    """A model copied half-way (its card beside it): the server CLI, the web app and a distillation teacher say
    so instead of failing inside ONNX Runtime."""
    import shutil

    from model_training.data.datasets import DataError
    from model_training.training.distillation import Teacher
    from uplink_server.model import Classifier
    from web_app.app import load_local_model
    from web_app.config import Settings

    bad = tmp_path / "model.onnx"
    bad.write_bytes((tiny_run / "model.onnx").read_bytes()[:20_000])
    shutil.copy(tiny_run / "model_card.json", tmp_path / "model_card.json")
    assert main(["predict", str(one_xray), "--model", str(bad)]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://", secret_key="s", uplink_key="u", model_path=str(bad))
    assert load_local_model(settings) is None  # the web app serves and waits for model servers
    assert "not a readable ONNX model" in capsys.readouterr().out
    good = Classifier(tiny_run / "model.onnx")
    with pytest.raises(DataError, match="not a readable ONNX model"):
        Teacher(bad, good.classes, good.spec)


@pytest.mark.parametrize("make,code", [
    (lambda: Image.new("L", (256, 256), 128), "blank_image"),
    (lambda: Image.fromarray(np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)), "color_photo"),
])
def test_image_level_refusals(classifier, make, code):
    buf = io.BytesIO()
    make().save(buf, format="PNG")
    pred = classifier.predict(buf.getvalue())
    assert pred.refused and pred.refusal["code"] == code


def test_anvil_functions_with_anvil_media(classifier, one_xray, xray_paths):
    anvil = pytest.importorskip("anvil")
    from uplink_server.anvil_uplink import make_functions

    fns = make_functions(classifier)
    media = anvil.BlobMedia("image/jpeg", xray_paths["covid"][0].read_bytes(), name="cxr.jpg")
    out = fns["classify_xray"](media)
    assert out["label"] in classifier.classes and not out["refused"]
    assert isinstance(out["heatmap"], anvil.BlobMedia) and out["heatmap"].content_type == "image/png"
    assert out["heatmap"].get_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = fns["classify_xray"](anvil.BlobMedia("text/plain", b"hello", name="x.txt"))
    assert bad["refused"] and bad["refusal"]["code"] == "not_an_image" and bad["heatmap"] is None
    assert fns["model_info"]()["classes"] == classifier.classes


def test_module_runs_as_a_command(tiny_model, one_xray):
    r = subprocess.run([sys.executable, "-m", "uplink_server", "predict", str(one_xray), "--model", str(tiny_model),
                        "--no-ood"], capture_output=True, text=True, cwd=str(tiny_model.parent), env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert "normal=" in r.stdout and "ms]" in r.stdout


def test_serving_does_not_import_torch(tiny_model, one_xray):
    code = ("import sys; from uplink_server.model import Classifier; c = Classifier(sys.argv[1]); "
            "c.predict(sys.argv[2]); assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_model), str(one_xray)], capture_output=True, text=True,
                       env=subprocess_env())
    assert r.returncode == 0, r.stderr


def test_sessions_run_on_an_accelerator_or_the_cpu_never_a_remote_provider(classifier):
    """onnxruntime lists the AzureExecutionProvider first; a session led by it looked like a GPU one, so batches
    were never split over the per-core sessions."""
    from uplink_server.onnx_backend import execution_providers

    providers = classifier._backend.sess.get_providers()
    assert "AzureExecutionProvider" not in providers and providers[-1] == "CPUExecutionProvider"
    assert execution_providers()[-1] == "CPUExecutionProvider"
    backend = classifier._backend
    classifier.run(np.zeros((4, 3, *classifier.spec.size), np.float32))  # a batch on the CPU: one session per core
    n = min(backend.threads, backend.MAX_WORKERS)
    assert len(backend._workers) == (n if n > 1 else 0)


def test_a_reply_carries_the_picture_or_the_class_map_and_a_web_app_reads_either(classifier, one_xray):
    """The model-server side of the heatmap protocol and the web-app side, on a real prediction: a job that asks for
    the map gets it (and no picture), an older job gets the picture; a broken map costs the heatmap, not the answer."""
    import json

    from uplink_server import gradcam
    from web_app.inference import Outcome

    data = one_xray.read_bytes()
    mapped = classifier.predict(data, heatmap=gradcam.MAP_ONLY)
    reply = json.loads(json.dumps({"result": mapped.to_dict(), **mapped.heatmap_fields()}))  # as it travels
    assert reply["heatmap_png"] is None and len(json.dumps(reply["heatmap_map"])) < 8000
    out = Outcome.from_reply(reply, "broker:gpu-1")
    cam, box, shape = out.heatmap_map
    assert out.heatmap_png is None and out.result["label"] == mapped.label
    assert np.allclose(cam, mapped.heatmap, atol=1e-6) and box == mapped.heatmap_box and shape == mapped.heatmap_shape

    drawn = classifier.predict(data)
    reply = json.loads(json.dumps({"result": drawn.to_dict(), **drawn.heatmap_fields()}))
    out = Outcome.from_reply(reply, "uplink:old")
    assert out.heatmap_png == drawn.heatmap_png and out.heatmap_map is None and "heatmap_map" not in reply

    for broken in ({"cam": "x", "shape": [1, 2]}, {"cam": [[0.1]], "shape": [5]}, {"box": [0, 1, 0, 1]}):
        out = Outcome.from_reply({"result": mapped.to_dict(), "heatmap_png": None, "heatmap_map": broken}, "broker:odd")
        assert out.heatmap_map is None and out.heatmap_png is None and out.result["label"] == mapped.label


def test_a_kept_class_map_draws_the_models_picture_and_a_damaged_one_is_refused(classifier, one_xray, tmp_path):
    """The map a web app keeps on disk draws the picture the model draws; a truncated file, one that is not a map and
    one made on an image of another shape (turned since) raise ValueError (the web app answers 404 for the heatmap, the case stands)."""
    from uplink_server import gradcam
    from uplink_server.imaging import decode

    data = one_xray.read_bytes()
    mapped, drawn = classifier.predict(data, heatmap=gradcam.MAP_ONLY), classifier.predict(data)
    kept = tmp_path / "case.heatmap.json"
    gradcam.save_map(kept, mapped.heatmap, mapped.heatmap_box, mapped.heatmap_shape)
    gray = decode(data).gray
    assert gradcam.render(kept, gray) == drawn.heatmap_png
    whole = kept.read_text()
    for damaged in (whole[: len(whole) // 2], '{"cam": [1, 2, 3], "shape": [4, 4]}', "[]"):
        kept.write_text(damaged)
        with pytest.raises(ValueError):
            gradcam.render(kept, gray)
    kept.write_text(whole)
    with pytest.raises(ValueError, match="the map was made on"):
        gradcam.render(kept, gray[1:])
