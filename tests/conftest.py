"""Shared fixtures: real images from ../shared/data and one tiny real model.

The tiny model is trained once per session on a few dozen real X-rays at a
tiny input size (seconds on a CPU) and exported to ONNX like any other run.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CXR_DATA_ROOT", REPO.parent / "shared" / "data"))
ARTIFACTS = REPO / "test-artifacts"


def _rows(name: str) -> list[dict]:
    with open(DATA / name / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "kermany" / "labels.csv").exists():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def xray_paths(data_root) -> dict[str, list[Path]]:
    """A few real images of each kind: child normal/pneumonia, adult covid/normal."""
    k = _rows("kermany")
    out = {
        "kermany_normal": [data_root / "kermany" / r["path"] for r in k if r["label"] == "normal" and r["split"] == "test"][:4],
        "kermany_pneumonia": [data_root / "kermany" / r["path"] for r in k if r["label"] == "pneumonia" and r["split"] == "test"][:4],
        "covid": [data_root / "covid" / r["path"] for r in _rows("covid") if r["label"] == "covid19"][:4],
        "adult_normal": [data_root / "radiography" / r["path"] for r in _rows("radiography") if r["label"] == "normal"][:4],
    }
    return out


@pytest.fixture(scope="session")
def one_xray(xray_paths) -> Path:
    return xray_paths["kermany_normal"][0]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_root) -> Path:
    """A real 3-class model trained for one epoch on 24 images per split at 64 px."""
    pytest.importorskip("torch")
    from model_training.cli import main

    out = tmp_path_factory.mktemp("tiny_run")
    rc = main(["train", "--data", "mix", "--arch", "efficientnet_lite0", "--pretrained", "imagenet",
               "--img-size", "64", "--epochs", "1", "--limit", "24", "--batch-size", "8", "--workers", "0",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def second_run(tiny_run, tmp_path_factory) -> Path:
    """Another tiny model on exactly the tiny run's split (its manifest as data), with another seed."""
    pytest.importorskip("torch")
    from model_training.cli import main

    out = tmp_path_factory.mktemp("second_run")
    assert main(["train", "--data", str(tiny_run / "splits.csv"), "--arch", "efficientnet_lite0", "--pretrained", "imagenet",
                 "--img-size", "64", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--seed", "1",
                 "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def ensemble_run(tiny_run, second_run, tmp_path_factory) -> Path:
    from model_training.cli import main

    out = tmp_path_factory.mktemp("ensemble")
    assert main(["ensemble", "--models", str(tiny_run / "model.onnx"), str(second_run / "model.onnx"),
                 "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_run) -> Path:
    return tiny_run / "model.onnx"


@pytest.fixture(scope="session")
def classifier(tiny_model):
    from uplink_server.model import Classifier

    return Classifier(tiny_model)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def subprocess_env(**extra: str) -> dict:
    """A minimal environment for running the project's CLIs in a child process."""
    return {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **extra}


def copy_into(paths, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        dst = folder / Path(p).name
        shutil.copy(p, dst)
        out.append(dst)
    return out


# Debian's Chromium for the browser tests (playwright cannot download its own here)
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()
