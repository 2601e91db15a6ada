"""The lung segmenter (trained on the real lung masks), the lung-field box a model reads, and CLAHE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uplink_server.imaging import decode
from uplink_server.lungfield import SegmenterMissing, box_from_mask, lung_box, lung_probability
from uplink_server.preprocessing import PreprocessSpec, preprocess, view_box

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "lung-segmenter.onnx"


@pytest.fixture(scope="module")
def unseen_masks(data_root):
    """Masks of the patients the shipped segmenter was checked on (never trained on)."""
    from model_training.data.lungs import load_masks
    from model_training.networks.segmenter import split_by_patient

    card = json.loads(SHIPPED.with_name("lung-segmenter.card.json").read_text())
    _, val = split_by_patient(load_masks(), 0.2, 0)
    assert len({m.patient_id for m in val}) == card["validation"]["patients"]
    return val[:12]


def test_box_from_mask_ignores_specks_and_distrusts_tiny_masks():
    mask = np.zeros((100, 100), bool)
    mask[20:80, 15:45] = mask[20:80, 55:85] = True  # two lungs
    t, b, l, r = box_from_mask(mask, (200, 300), margin=0.0)
    assert (t, b, l, r) == (40, 160, 45, 255)  # scaled to the image's own size
    mask[0, 0] = True  # a stray pixel does not stretch the box
    assert box_from_mask(mask, (200, 300), margin=0.0)[0] == 40
    assert box_from_mask(np.zeros((100, 100), bool), (200, 300)) == (0, 200, 0, 300)  # no lungs: whole frame
    sliver = np.zeros((100, 100), bool)
    sliver[:, 40:48] = True
    assert box_from_mask(sliver, (200, 300)) == (0, 200, 0, 300)  # a box too narrow to be two lungs


def test_shipped_segmenter_finds_the_lungs_of_patients_it_never_saw(unseen_masks):
    from model_training.networks.segmenter import box_checks, dice

    areas = []
    for m in unseen_masks:
        gray, true = decode(m.image).gray, m.load()
        prob = lung_probability([gray], SHIPPED)[0]
        pred = np.asarray(Image.fromarray((prob * 255).astype(np.uint8)).resize(true.shape[::-1], Image.BILINEAR)) > 127
        assert dice(pred, true) > 0.8, m.image
        checks = box_checks(prob > 0.5, true)
        assert checks["lungs_inside_box"] > 0.95  # the box never cuts the lungs
        areas.append(checks["box_area"])
    assert np.mean(areas) < 0.9  # and it does cut the rest: borders, text, markers, abdomen


def test_a_flat_image_has_no_lungs_and_a_missing_segmenter_is_named(tmp_path):
    assert lung_box(np.full((300, 200), 0.4, np.float32), SHIPPED) == (0, 300, 0, 200)
    with pytest.raises(SegmenterMissing, match="model_training segmenter"):
        lung_box(np.zeros((10, 10), np.float32), tmp_path / "nowhere.onnx")


def test_lungs_roi_reads_only_the_box_around_the_lungs(xray_paths, monkeypatch):
    monkeypatch.setenv("CXR_LUNG_SEGMENTER", str(SHIPPED))
    for path in (xray_paths["covid"][0], xray_paths["kermany_pneumonia"][0], xray_paths["adult_normal"][0]):
        gray = decode(path).gray
        spec = PreprocessSpec(size=(64, 64), roi="lungs")
        top, bottom, left, right = view_box(gray, spec)
        assert 0 <= top < bottom <= gray.shape[0] and 0 <= left < right <= gray.shape[1]
        assert np.allclose(preprocess(gray, spec), preprocess(gray[top:bottom, left:right], PreprocessSpec(size=(64, 64))))
        # lungmask: the same box, with what is not lung (grown a little) blacked out
        masked = preprocess(gray, PreprocessSpec(size=(64, 64), roi="lungmask", mean=(0.0,), std=(1.0,), channels=1))[0]
        assert view_box(gray, PreprocessSpec(roi="lungmask")) == (top, bottom, left, right)
        black = masked < 0.02
        assert 0.15 < black.mean() < 0.7, path  # the mediastinum and the corners of the box
        assert not black[20:44, 8:20].all() and not black[20:44, 44:56].all()  # the lungs themselves are kept


def test_segmenter_trains_on_the_real_masks_and_beats_a_mask_of_everything(tmp_path):
    from model_training.cli import main

    out = tmp_path / "seg.onnx"
    assert main(["segmenter", "--out", str(out), "--epochs", "6", "--limit-patients", "30",
                 "--check-sources", "", "--no-progress"]) == 0
    card = json.loads(out.with_name("seg.card.json").read_text())
    val = card["validation"]
    # a mask of the whole image scores 2a/(1+a) with lung area a of about 0.37: 0.54
    assert val["dice_mean"] > 0.65 and val["lungs_inside_box"] > 0.9
    assert card["onnx_max_abs_diff"] < 1e-3 and card["validation"]["patients"] == 6
    assert out.with_name("seg.card.md").read_text().startswith("# Lung segmenter")
    assert lung_probability([np.zeros((50, 40), np.float32)], out).shape == (1, 128, 128)


def test_a_model_trained_on_the_lung_field_is_served_the_same_way(tmp_path, xray_paths, monkeypatch):
    from model_training.cli import main
    from model_training.data.datasets import Record
    from model_training.training.train import XrayDataset
    from uplink_server.gradcam import in_frame
    from uplink_server.model import Classifier, ModelNotFound

    monkeypatch.setenv("CXR_LUNG_SEGMENTER", str(SHIPPED))
    out = tmp_path / "run"
    assert main(["train", "--data", "mix", "--img-size", "64", "--epochs", "1", "--limit", "12", "--batch-size", "8",
                 "--workers", "0", "--roi", "lungs", "--intensity", "clahe", "--out", str(out), "--no-progress"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["preprocessing"]["roi"] == "lungs" and card["preprocessing"]["intensity"] == "clahe"
    clf = Classifier(out / "model.onnx")
    path = str(xray_paths["covid"][2])
    train_x = XrayDataset([Record(path=path, label="covid19")], ["covid19"], clf.spec)[0][0].numpy()
    assert np.array_equal(train_x, clf.preprocess(decode(path)))
    gray = decode(path).gray
    top, bottom, left, right = view_box(gray, clf.spec)
    assert (bottom - top) * (right - left) < gray.size  # this X-ray has borders the model does not read
    pred = clf.predict(path, check_ood=False)
    heat = in_frame(pred.heatmap, gray.shape[::-1], (top, bottom, left, right), gray.shape)
    outside = np.ones(gray.shape, bool)
    outside[top:bottom, left:right] = False
    assert heat[outside].max() == 0 and heat.max() > 0  # the heatmap is drawn where the model looked
    monkeypatch.setenv("CXR_LUNG_SEGMENTER", str(tmp_path / "gone.onnx"))
    from uplink_server import lungfield

    lungfield._sessions.clear()
    with pytest.raises(ModelNotFound, match="lung field"):
        Classifier(out / "model.onnx")
    lungfield._sessions.clear()


def test_clahe_undoes_a_machines_exposure_curve(xray_paths):
    from uplink_server.preprocessing import clahe

    gray = np.clip(decode(xray_paths["adult_normal"][1]).gray, 0, 1)
    darker = gray ** 2.0  # another machine's exposure curve
    spec = PreprocessSpec(size=(128, 128), intensity="clahe")
    plain = PreprocessSpec(size=(128, 128))
    raw_gap = np.abs(preprocess(gray, plain) - preprocess(darker, plain)).mean()
    assert np.abs(preprocess(gray, spec) - preprocess(darker, spec)).mean() < raw_gap / 2
    x = clahe(gray)
    assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1 and x.shape == gray.shape


def test_screen_variants_combine_by_name():
    from model_training.evaluation.features import variant_spec

    spec = variant_spec("equalize+lungs")
    assert spec.intensity == "equalize" and spec.roi == "lungs" and spec.crop == 0
    with pytest.raises(ValueError, match="unknown preprocessing variant"):
        variant_spec("lungs+sharpen")
