"""Leave-one-source-out validation, the shortcut probe, lung-field heatmap share, intensity normalisation and
the ship rule, on real images from the shared data."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("torch")

from model_training.cli import main  # noqa: E402
from model_training.data.datasets import load_spec  # noqa: E402
from model_training.data.splits import check_patient_disjoint  # noqa: E402
from model_training.evaluation.external import fold_split, holdout_groups  # noqa: E402
from uplink_server.imaging import decode  # noqa: E402
from uplink_server.preprocessing import PreprocessSpec, crop_box, equalize, preprocess  # noqa: E402


@pytest.fixture(scope="module")
def mix(data_root):
    return load_spec("mix")


def test_every_source_is_held_out_and_single_class_sources_are_paired(mix):
    folds = holdout_groups(mix)
    held = [s for srcs in folds.values() for s in srcs]
    assert sorted(held) == sorted({r.source for r in mix}), "each source held out exactly once"
    labels = {f: Counter(r.label for r in mix if r.source in srcs) for f, srcs in folds.items()}
    # hannover holds only COVID-19: it is held out with the smallest adult source that has other classes
    assert folds["covid/hannover+covid/figure1"] == ["covid/hannover", "covid/figure1"]
    for f, c in labels.items():
        assert len(c) >= 2, f"{f} has one class only: no AUC ({c})"
    assert labels["radiography"]["covid19"] and labels["radiography"]["normal"]
    assert "covid19" not in labels["kermany"]  # children: no COVID-19 anywhere in the data


def test_fold_split_keeps_the_held_out_hospital_out_of_training(mix):
    tr, va, te = fold_split(mix, ["covid/ieee8023"])
    assert {r.source for r in te} == {"covid/ieee8023"}
    assert "covid/ieee8023" not in {r.source for r in tr + va}
    assert len(tr) + len(va) + len(te) == len(mix)
    check_patient_disjoint(tr + va + te)
    assert all(r.split == "test" for r in te) and {r.split for r in mix if r.source == "kermany"} == {"train", "test"}


def test_equalize_spreads_every_machine_over_the_same_intensities(xray_paths):
    for path in (xray_paths["kermany_normal"][0], xray_paths["adult_normal"][0], xray_paths["covid"][0]):
        gray = decode(path).gray
        x = equalize(gray)
        hist = np.histogram(x, bins=8, range=(0, 1))[0] / x.size
        assert np.abs(hist - 1 / 8).max() < 0.05, hist  # flat: the same intensities whatever the exposure
        order = np.argsort(gray.ravel(), kind="stable")
        assert np.all(np.diff(x.ravel()[order]) >= 0)  # monotone: darker stays darker
    assert np.array_equal(equalize(np.full((8, 8), 0.3, np.float32)), np.full((8, 8), 0.3, np.float32))


def test_equalize_is_the_histogram_and_interpolation_it_stands_for(xray_paths):
    """The fast equal-bin equalisation gives what np.histogram and np.interp give: on real films of three sources, as
    decoded and at the model's size, and on a resized film that overshoots [0, 1] as bicubic resampling does."""
    from uplink_server.pixels import resize_gray

    def reference(x, bins=256):
        hist, edges = np.histogram(x, bins=bins, range=(0.0, 1.0))
        cdf = np.cumsum(hist).astype(np.float64)
        return np.interp(x, edges[1:], (cdf - cdf[0]) / (cdf[-1] - cdf[0])).astype(np.float32)

    for path in (xray_paths["kermany_normal"][0], xray_paths["adult_normal"][0], xray_paths["covid"][0]):
        gray = decode(path).gray
        over = (resize_gray(gray, (224, 224)) - 0.5) * 1.1 + 0.5  # some values below 0 and above 1
        assert over.min() < 0 or over.max() > 1
        for x in (gray, resize_gray(gray, (224, 224)), over.astype(np.float32)):
            assert np.abs(equalize(x) - reference(x)).max() < 1e-6


def test_crop_cuts_the_borders_before_resizing(one_xray):
    gray = decode(one_xray).gray
    spec = PreprocessSpec(size=(64, 64), crop=0.1)
    top, bottom, left, right = crop_box(gray.shape, 0.1)
    assert np.allclose(preprocess(gray, spec), preprocess(gray[top:bottom, left:right], PreprocessSpec(size=(64, 64))))
    with pytest.raises(ValueError, match="crop"):
        PreprocessSpec(crop=0.6)
    with pytest.raises(ValueError, match="intensity"):
        PreprocessSpec(intensity="gamma")
    with pytest.raises(ValueError, match="use one"):
        PreprocessSpec(crop=0.1, roi="lungs")


def test_heatmap_of_a_cropped_model_is_drawn_inside_its_box():
    from uplink_server.gradcam import in_frame

    box = crop_box((80, 100), 0.1)
    heat = in_frame(np.ones((7, 7), np.float32), (100, 80), box, (80, 100))  # size (width, height), shape (h, w)
    assert heat.shape == (80, 100)
    assert heat[:8].max() == 0 and heat[:, :10].max() == 0 and heat[40, 50] == 1
    half = in_frame(np.ones((7, 7), np.float32), (50, 40), box, (80, 100))  # drawn at half the size: the box scales
    assert half[:4].max() == 0 and half[:, :5].max() == 0 and half[36:].max() == 0 and half[20, 25] == 1


def test_a_model_trained_with_equalize_and_crop_is_served_the_same_way(tmp_path, xray_paths):
    from model_training.data.datasets import Record
    from model_training.training.train import XrayDataset
    from uplink_server.model import Classifier

    out = tmp_path / "run"
    assert main(["train", "--data", "mix", "--img-size", "64", "--epochs", "1", "--limit", "12", "--batch-size", "8",
                 "--workers", "0", "--intensity", "equalize", "--crop", "0.08", "--balance", "source",
                 "--out", str(out), "--no-progress"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["preprocessing"]["intensity"] == "equalize" and card["preprocessing"]["crop"] == 0.08
    clf = Classifier(out / "model.onnx")
    path = str(xray_paths["covid"][1])
    train_x = XrayDataset([Record(path=path, label="covid19")], ["covid19"], clf.spec)[0][0].numpy()
    assert np.array_equal(train_x, clf.preprocess(decode(path)))
    pred = clf.predict(path)
    assert pred.heatmap_png and not pred.refused or pred.refusal


def test_source_probe_reads_a_planted_hospital_mark_and_nothing_else():
    from model_training.evaluation.probe import source_probe

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(240, 32))
    labels = ["covid19"] * 240
    sources = ["a"] * 120 + ["b"] * 120
    blind = source_probe(emb, labels, sources)
    assert blind["balanced_accuracy"] < 0.65 and blind["chance"] == 0.5
    emb[:120, 3] += 4.0  # one hospital's machine leaves a mark
    marked = source_probe(emb, labels, sources)
    assert marked["balanced_accuracy"] > 0.9


def test_lung_share_of_heatmaps_on_real_masks(data_root):
    from model_training.data.lungs import load_masks, lung_share

    masks = load_masks()
    assert len(masks) > 300
    mask = masks[0].load()
    small = np.asarray(mask[:: max(1, mask.shape[0] // 14), :: max(1, mask.shape[1] // 14)], np.float32)
    assert lung_share(small, mask) > 0.8  # a heatmap on the lungs
    assert lung_share(1 - small, mask) < 0.35  # a heatmap on everything but the lungs


def test_screen_and_ship_check_on_real_images(tmp_path, tiny_model, capsys):
    import shutil

    carded = tmp_path / "carded"
    shutil.copytree(tiny_model.parent, carded)
    out = tmp_path / "screen"
    assert main(["external", "--limit-per-source", "14", "--variants", "plain,equalize+lungs", "--recipes", "erm,adversarial",
                 "--baseline-model", str(tiny_model), "--out", str(out), "--no-progress",
                 "--write-card", str(carded / "model.onnx"), "--card-recipe", "plain/erm"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "loso.json").read_text())
    assert set(report["results"]) == {"plain/erm", "plain/adversarial", "equalize+lungs/erm", "equalize+lungs/adversarial"}
    lungs_erm = report["results"]["equalize+lungs/erm"]
    assert lungs_erm["preprocessing"]["roi"] == "lungs" and lungs_erm["preprocessing"]["intensity"] == "equalize"
    # heatmaps of a lung-field model are drawn back into its box before the share on the lungs is measured
    box_share = lungs_erm["folds"]["covid/ieee8023"]["lung_share"]
    assert 0 < box_share["mean_share_in_lungs"] < 1
    frame_share = report["results"]["plain/erm"]["folds"]["covid/ieee8023"]["lung_share"]
    # a flat map gets the lungs' share of what the model read: higher in the lung box than in the whole frame
    assert frame_share["flat_share"] == pytest.approx(frame_share["mean_lung_area"])
    assert box_share["flat_share"] > frame_share["flat_share"] + 0.05
    assert (out / "loso.md").read_text() in printed and (out / "loso.png").stat().st_size > 1000
    res = report["results"]["plain/erm"]
    assert set(res["folds"]) == set(report["folds"])
    for fold, m in res["folds"].items():
        if "covid19" in m["counts"] and len(m["counts"]) > 1:
            c = m["covid19"]
            assert 0 <= c["auc"] <= 1 and c["auc_ci95"][0] <= c["auc"] <= c["auc_ci95"][1]
            # the AUC against all negatives is the count-weighted mean of the AUCs against each finding
            n = {k: m["counts"][k] for k in c["auc_vs"]}
            assert c["auc"] == pytest.approx(sum(n[k] * v for k, v in c["auc_vs"].items()) / sum(n.values()), abs=1e-9)
    assert res["worst_covid19"]["auc"] == min(m["covid19"]["auc"] for m in res["folds"].values()
                                             if m.get("covid19", {}).get("auc") is not None and not m["covid19"]["few"])
    assert 0 < res["folds"]["covid/ieee8023"]["lung_share"]["mean_share_in_lungs"] < 1  # masks are ieee8023 images
    assert "lung_share" not in res["folds"]["kermany"]
    assert 0 <= res["probe"]["balanced_accuracy"] <= 1
    # the shipped-style checks: heatmaps of the served model on the masked images among the records
    assert 0 < report["baseline"]["lung_share"]["n"] <= res["folds"]["covid/ieee8023"]["counts"]["covid19"] + 20
    assert "probe" in report["baseline"]

    # the card: the recipe's held-out table, the probe, the ship rule against the best other recipe, the plot
    card = json.loads((carded / "model_card.json").read_text())["external"]
    assert card["recipe"] == "plain/erm" and set(card["per_fold"]) == set(report["folds"])
    assert card["best_other"]["recipe"] in set(report["results"]) - {"plain/erm"} and "ships" in card["ship_rule"]
    assert set(card["passing"]) <= set(report["results"]) - {"plain/erm"}
    assert card["ship_rule"]["ships"] == (card["best_other"]["recipe"] in card["passing"])
    md = (carded / "model_card.md").read_text()
    assert "## Hospitals it has not seen (leave one source out)" in md and (carded / card["plot"]).is_file()

    # the ship rule on two real results: a candidate never beats itself
    rc = main(["ship-check", "--candidate", f"{out / 'loso.json'}#plain/erm", "--baseline", f"{out / 'loso.json'}#plain/erm"])
    verdict = json.loads(capsys.readouterr().out)
    assert rc == 1 and not verdict["ships"] and "does not beat" in verdict["checks"][0]
    assert main(["ship-check", "--candidate", str(out / "loso.json"), "--baseline", str(out / "loso.json")]) == 2
    assert "name one" in capsys.readouterr().err


def test_ship_rule_numbers():
    from model_training.release.ship_rule import decide

    base = {"name": "1.5.0", "worst_covid19": {"auc": 0.66}, "in_source": {"run_test_accuracy": 0.936, "kermany_test_accuracy": 0.907}}
    good = {"name": "new", "worst_covid19": {"auc": 0.80}, "in_source": {"run_test_accuracy": 0.93, "kermany_test_accuracy": 0.90}}
    assert decide(good, base)["ships"]
    worse_in_source = {**good, "in_source": {"run_test_accuracy": 0.92, "kermany_test_accuracy": 0.90}}
    assert not decide(worse_in_source, base)["ships"]
    assert not decide({"name": "x", "worst_covid19": {}, "in_source": good["in_source"]}, base)["ships"]


def test_parity_rule_for_a_cheaper_model_of_the_same_task():
    from model_training.release.ship_rule import parity

    def card(run, kermany, ece, framing):
        return {"evaluation": {"run_test_split": {"accuracy": run}, "kermany_official_test": {"accuracy": kermany}},
                "calibration": {"ece_test_after": ece}, "framing_check": {"validation": {"1.4": {"rate": framing}}}}

    def served(nih, tb):
        return {"name": "served", "folds": {"nih": {"triage": {"roc_auc": nih}}, "tb": {"triage": {"roc_auc": tb}},
                                            "covid/x": {"triage": {"roc_auc": None}}}}

    base, base_card = served(0.684, 0.586), card(0.936, 0.907, 0.018, 0.01)
    assert parity(served(0.670, 0.600), base, card(0.932, 0.907, 0.025, 0.02), base_card)["ships"]
    for cand, cand_card, failing in [
        (served(0.670, 0.600), card(0.930, 0.907, 0.025, 0.02), "run_test_accuracy"),  # 0.6 points lower
        (served(0.670, 0.600), card(0.936, 0.907, 0.029, 0.02), "test ECE"),
        (served(0.660, 0.600), card(0.936, 0.907, 0.018, 0.02), "unseen nih"),
        (served(0.684, None), card(0.936, 0.907, 0.018, 0.02), "unseen tb"),
        (served(0.684, 0.586), card(0.936, 0.907, 0.018, 0.06), "framed"),
        (served(0.684, 0.586), {}, "kermany_test_accuracy"),
    ]:
        verdict = parity(cand, base, cand_card, base_card)
        assert not verdict["ships"]
        assert any(failing in c and c.endswith("fails") for c in verdict["checks"]), (failing, verdict["checks"])
    # no unseen source measured on both: nothing to compare, no claim
    assert not parity({"folds": {}}, {"folds": {}}, base_card, base_card)["ships"]


def test_parity_check_needs_both_cards(capsys):
    assert main(["ship-check", "--candidate", "a.json", "--baseline", "b.json", "--parity", "weights/cxr-screen.onnx"]) == 2
    assert "--candidate-model" in capsys.readouterr().err


@pytest.mark.slow
def test_full_loso_fine_tunes_per_fold_and_tests_through_the_server(tmp_path, mix):
    out = tmp_path / "full"
    assert main(["external", "--mode", "full", "--folds", "covid/ieee8023", "--limit-per-source", "10",
                 "--img-size", "64", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "loso.json").read_text())
    m = report["results"]["full"]["folds"]["covid/ieee8023"]
    assert m["covid19"]["positives"] > 0 and m["covid19"]["negatives"] > 0 and 0 <= m["covid19"]["auc"] <= 1
    manifest = (out / "covid_ieee8023" / "fold.csv").read_text()
    assert "covid/ieee8023" in manifest
    trained_on = json.loads((out / "covid_ieee8023" / "run" / "model_card.json").read_text())
    assert "covid/ieee8023" not in trained_on["metrics"]["val"]["by_source"]
    assert set(trained_on["metrics"]["test"]["by_source"]) == {"covid/ieee8023"}
    assert main(["external", "--mode", "full", "--folds", "nowhere", "--limit-per-source", "10", "--out", str(out)]) == 2


def test_a_radiograph_in_two_collections_is_not_trained_on_when_its_twin_is_held_out(tmp_path, xray_paths):
    import shutil

    from model_training.data.datasets import Record
    from model_training.evaluation.external import image_hashes

    twin = tmp_path / "twin.jpg"
    shutil.copy(xray_paths["covid"][0], twin)
    recs = [Record(path=str(p), label="covid19", source="a", patient_id=f"a{i}") for i, p in enumerate(xray_paths["covid"])]
    recs += [Record(path=str(p), label="normal", source="a", patient_id=f"n{i}") for i, p in enumerate(xray_paths["adult_normal"])]
    recs += [Record(path=str(twin), label="covid19", source="b", patient_id="b0"),
             Record(path=str(xray_paths["kermany_normal"][0]), label="normal", source="b", patient_id="b1")]
    tr, va, te = fold_split(recs, ["b"], val_frac=0.0, hashes=image_hashes(recs, progress=False))
    kept = {r.path for r in tr + va}
    assert str(xray_paths["covid"][0]) not in kept and len(kept) == len(recs) - 2 - 1
    tr, va, te = fold_split(recs, ["b"], val_frac=0.0)  # without hashes: nothing checked
    assert str(xray_paths["covid"][0]) in {r.path for r in tr + va}


def test_uncertainty_rule_and_drift_reference_are_chosen_on_the_validation_split(tmp_path, tiny_run, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "splits.csv").unlink()  # its paths are relative to where the run was written: read the original's
    splits = str(tiny_run / "splits.csv")
    assert main(["uncertainty", "--model", str(run / "model.onnx"), "--data", splits, "--write-card", "--no-progress"]) == 0
    assert main(["reference", "--model", str(run / "model.onnx"), "--data", splits, "--no-progress"]) == 0
    card = json.loads((run / "model_card.json").read_text())
    n_val = sum(1 for line in (tiny_run / "splits.csv").read_text().splitlines() if ",val," in line)
    assert card["uncertainty"]["validation"]["n"] == n_val == card["reference"]["n"]
    assert abs(sum(card["reference"]["hist"]["risk"]) - 1) < 1e-3
    assert "## Uncertainty rule" in (run / "model_card.md").read_text()
    assert main(["reference", "--model", str(run / "model.onnx")]) == 2
    assert "no splits manifest" in capsys.readouterr().err


def test_the_loso_plot_shows_triage_where_a_report_has_no_covid_folds(tmp_path):
    """Folds of adult sources (nih, tb) carry triage AUCs only: the card's plot shows those, not an empty chart."""
    from model_training.evaluation.external import plot

    report = {"folds": {"nih": ["nih"], "tb": ["tb"]},
              "results": {"full": {"folds": {"nih": {"triage": {"roc_auc": 0.62}}, "tb": {"triage": {"roc_auc": 0.61}}}}}}
    plot(report, tmp_path / "triage.png")
    assert (tmp_path / "triage.png").stat().st_size > 1000
    plot({"folds": {"nih": ["nih"]}, "results": {"full": {"folds": {"nih": {}}}}}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()  # nothing measured: no chart


def test_a_fine_tuned_run_in_the_card_keeps_the_screen_of_every_source(tmp_path, tiny_model):
    """Two fine-tuned folds written to a card do not erase its screen of six sources: each mode keeps its table and plot."""
    import shutil

    from model_training.evaluation.external import plot, write_to_card

    carded = tmp_path / "carded"
    shutil.copytree(tiny_model.parent, carded)

    def report(mode, recipe, folds, auc):
        per = {f: {"n": 20, "accuracy": 0.5, "ece": 0.1, "counts": {"normal": 10, "pneumonia": 10},
                   "triage": {"roc_auc": auc, "normal": 10, "abnormal": 10}} for f in folds}
        return {"mode": mode, "folds": {f: [f] for f in folds}, "results": {recipe: {"folds": per}}}

    for mode, recipe, folds, auc in (("screen", "equalize/source", ["kermany", "nih", "tb"], 0.6),
                                     ("full", "full", ["nih", "tb"], 0.62)):
        rep = report(mode, recipe, folds, auc)
        plot(rep, tmp_path / f"{mode}.png")
        write_to_card(carded / "model.onnx", rep, recipe, command=f"external --mode {mode}", plot=tmp_path / f"{mode}.png")
    card = json.loads((carded / "model_card.json").read_text())["external"]
    assert card["mode"] == "full" and set(card["per_fold"]) == {"nih", "tb"}
    assert set(card["other_modes"]) == {"screen"} and set(card["other_modes"]["screen"]["per_fold"]) == {"kermany", "nih", "tb"}
    assert (carded / card["plot"]).is_file() and (carded / card["other_modes"]["screen"]["plot"]).is_file()
    assert card["plot"] != card["other_modes"]["screen"]["plot"]
    md = (carded / "model_card.md").read_text()
    section = md[md.index("## Hospitals it has not seen"):]
    assert "fine-tuned with the command below" in section and "### The fast screen" in section
    assert section.count("| kermany |") == 2  # the screen's fold table and its triage table; the fine-tuned run has none
    assert "Worst held-out COVID-19" not in section  # no COVID-19 fold in either run

    # the screen run again: it becomes the headline, the fine-tuned run is kept, nothing is nested twice
    rep = report("screen", "equalize/source", ["kermany", "nih", "tb"], 0.61)
    write_to_card(carded / "model.onnx", rep, "equalize/source")
    card = json.loads((carded / "model_card.json").read_text())["external"]
    assert card["mode"] == "screen" and set(card["other_modes"]) == {"full"} and "other_modes" not in card["other_modes"]["full"]
    assert (carded / "model_card.md").read_text().count("## Hospitals it has not seen") == 1
