"""Leave-one-source-out (LOSO) validation: does a recipe hold in a hospital it has never seen?

For every held-out group of sources, train on all the other sources and test on the held-out one.
A clinic in Ecuador is such a held-out hospital; scores inside our own splits are not.

- ``screen``: frozen backbone features (one cached pass over the data) and a head per recipe
  (:mod:`.heads`), for every preprocessing variant: the whole table in minutes on a CPU.
- ``full``: the real fine-tune (``model_training train``) per fold, for the recipes that win the screen,
  evaluated through the server's own model loading.

Each held-out test reports accuracy, ROC-AUC per class, COVID-19 sensitivity/specificity at the served
decision (the most probable class) and at specificity >= 0.80, and calibration (ECE after the
temperature fitted on the training sources' validation split).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from ..data.datasets import Record, write_manifest
from ..data.labels import CLASSES, NORMAL
from ..data.splits import find_near_duplicates, make_splits
from .calibration import calibrated_probs, fit_temperature
from .metrics import binary_operating_point, bootstrap_auc_ci, compute_metrics

POSITIVE = "covid19"
MIN_SPECIFICITY = 0.80  # the operating point: sensitivity at specificity >= 0.80
FEW = 20  # fewer negatives or positives than this: the AUC's interval is wide, and the report says so


def holdout_groups(records: list[Record]) -> dict[str, list[str]]:
    """Held-out groups: one per source; a source holding a single class is paired with the smallest source
    of the same age group that has the classes it lacks (so that its test has an AUC), and that partner is
    held out with it rather than alone. A source no partner can complete stays alone (no AUC)."""
    labels: dict[str, Counter] = defaultdict(Counter)
    age = {}
    for r in records:
        labels[r.source][r.label] += 1
        age[r.source] = r.age_group
    single = [s for s in sorted(labels) if len(labels[s]) < 2]
    folds, taken = {}, set()
    for s in single:
        partners = [t for t in labels if t not in single and t not in taken and age[t] == age[s]
                    and set(labels[t]) - set(labels[s])]
        if partners:
            t = min(partners, key=lambda t: (sum(labels[t].values()), t))
            taken.add(t)
            folds[f"{s}+{t}"] = [s, t]
        else:
            folds[s] = [s]
    for s in sorted(labels):
        if s not in single and s not in taken:
            folds[s] = [s]
    return dict(sorted(folds.items()))


def fold_split(records: list[Record], held: list[str], val_frac: float = 0.1, seed: int = 0, hashes: dict | None = None):
    """(train, val, test): the held-out sources are the test, whole; the others are split by patient into
    train and validation (official splits of the other sources are ignored: all of them is training data).
    With ``hashes`` ({path: perceptual hash}), training images that are near-duplicates of a held-out image (the
    same radiograph in two collections) are left out: otherwise the held-out hospital is partly seen."""
    test = [replace(r, split="test") for r in records if r.source in held]
    rest = make_splits([replace(r, split="") for r in records if r.source not in held], val_frac, 0.0, seed)
    if hashes:
        recs = rest + test
        dups = find_near_duplicates(recs, np.stack([hashes[r.path] for r in recs]))
        seen = {d.b for d in dups if d.split_a == "test"}
        rest = [r for r in rest if r.path not in seen]
    return [r for r in rest if r.split == "train"], [r for r in rest if r.split == "val"], test


def image_hashes(records: list[Record], progress: bool = True) -> dict:
    """{path: perceptual hash} (cached on disk by preflight), for fold_split's near-duplicate check."""
    import os

    from ..data.preflight import hash_images

    hashes, _ = hash_images(records, workers=max(1, os.cpu_count() or 1), progress=progress)
    return {r.path: h for r, h in zip(records, hashes)}


def limit_per_source(records: list[Record], n: int, seed: int = 0) -> list[Record]:
    """At most ``n`` images of each (source, class), whole patients first come first (quick runs and tests)."""
    import random

    from ..data.splits import group_key

    rng = random.Random(seed)
    groups = defaultdict(list)
    for r in records:
        groups[group_key(r)].append(r)
    keys = sorted(groups)
    rng.shuffle(keys)
    taken, out = Counter(), []
    for k in keys:
        rs = groups[k]
        cell = (rs[0].source, rs[0].label)
        if taken[cell] < n:
            taken[cell] += len(rs)
            out.extend(rs)
    return out


def in_source_split(records: list[Record], seed: int = 0) -> list[Record]:
    """The usual split of all sources (Kermany's official test kept): what in-source numbers are measured on."""
    return make_splits([replace(r) for r in records], 0.1, 0.15, seed)


def triage_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float | None = None) -> dict:
    """Abnormal (any class but normal) against normal on 1 - p(normal): ROC-AUC with its bootstrap interval, and
    sensitivity/specificity at ``threshold`` (chosen on the training sources' validation split) and as served
    before triage (the most probable class)."""
    from .triage import operating_point, triage_scores

    if NORMAL not in classes:
        return {}
    y = np.asarray(y)
    abnormal = y != classes.index(NORMAL)
    scores = triage_scores(probs, classes)
    out = operating_point(scores, abnormal, threshold)
    said = probs.argmax(1) != classes.index(NORMAL)
    out["threshold"] = threshold
    out["sensitivity_argmax"] = float(said[abnormal].mean()) if abnormal.any() else None
    out["specificity_argmax"] = float((~said[~abnormal]).mean()) if (~abnormal).any() else None
    out["few"] = bool(min(abnormal.sum(), (~abnormal).sum()) < FEW)
    return out


def heldout_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str], triage_threshold: float | None = None) -> dict:
    """Metrics of one held-out test (integer labels ``y``, calibrated ``probs``)."""
    m = compute_metrics(y, probs, classes)
    out = {
        "n": m["n"], "accuracy": m["accuracy"], "ece": m["ece"],
        "counts": {c: v["support"] for c, v in m["per_class"].items() if v["support"]},
        "auc": {c: v["roc_auc"] for c, v in m["per_class"].items() if v["roc_auc"] is not None},
    }
    tri = triage_metrics(y, probs, classes, triage_threshold)
    if tri.get("roc_auc") is not None:
        out["triage"] = tri
    if POSITIVE in classes:
        k = classes.index(POSITIVE)
        pos = np.asarray(y) == k
        said = probs.argmax(1) == k
        cov = {"positives": int(pos.sum()), "negatives": int((~pos).sum()),
               "sensitivity_served": float(said[pos].mean()) if pos.any() else None,
               "specificity_served": float((~said[~pos]).mean()) if (~pos).any() else None}
        if pos.any() and (~pos).any():
            op = binary_operating_point(pos, probs[:, k], MIN_SPECIFICITY)
            cov.update(auc=op["roc_auc"], auc_ci95=bootstrap_auc_ci(pos, probs[:, k]),
                       sensitivity_at_spec=op["sensitivity"], specificity_at_spec=op["specificity"],
                       few=bool(min(pos.sum(), (~pos).sum()) < FEW))
            # against each other finding on its own: COVID-19 vs normal and vs other pneumonias fail differently
            y = np.asarray(y)
            cov["auc_vs"] = {c: float(roc_auc_score(np.r_[np.ones(pos.sum()), np.zeros((y == j).sum())],
                                                    np.r_[probs[pos, k], probs[y == j, k]]))
                             for j, c in enumerate(classes) if j != k and (y == j).any()}
        out["covid19"] = cov
    return out


def worst_covid(folds: dict) -> dict:
    """The worst held-out COVID-19 ROC-AUC (and its fold) over folds that have one, preferring folds with at
    least ``FEW`` of each class; the sensitivity at specificity >= 0.80 there too."""
    have = {f: m["covid19"] for f, m in folds.items() if m.get("covid19", {}).get("auc") is not None}
    solid = {f: c for f, c in have.items() if not c["few"]} or have
    if not solid:
        return {}
    f = min(solid, key=lambda f: solid[f]["auc"])
    return {"fold": f, "auc": solid[f]["auc"], "sensitivity_at_spec": min(c["sensitivity_at_spec"] for c in solid.values())}


# The adult sources with normal and abnormal films from one hospital: the triage ship rule's worst fold is taken
# over these (the children's kermany fold is reported beside it).
TRIAGE_SOURCES = ("nih", "tb")


def worst_triage(folds: dict, among=TRIAGE_SOURCES) -> dict:
    """The worst held-out triage ROC-AUC over the folds of ``among`` that have one."""
    have = {f: m["triage"] for f, m in folds.items()
            if f in among and m.get("triage", {}).get("roc_auc") is not None}
    if not have:
        return {}
    f = min(have, key=lambda f: have[f]["roc_auc"])
    return {"fold": f, "auc": have[f]["roc_auc"], "auc_ci95": have[f].get("roc_auc_ci95"),
            "among": [x for x in among if x in have],
            "kermany": (folds.get("kermany", {}).get("triage") or {}).get("roc_auc")}


def triage_threshold_on(y_val: np.ndarray, probs_val: np.ndarray, classes: list[str]) -> float | None:
    """The triage threshold for sensitivity >= 0.95 on a validation split (None without abnormal films)."""
    from .triage import TARGET_SENSITIVITY, threshold_for_sensitivity, triage_scores

    if NORMAL not in classes:
        return None
    abnormal = np.asarray(y_val) != classes.index(NORMAL)
    if not abnormal.any():
        return None
    return threshold_for_sensitivity(triage_scores(probs_val, classes), abnormal, TARGET_SENSITIVITY)


def in_source_by_source(te: list[Record], probs: np.ndarray, classes: list[str], threshold: float | None) -> dict:
    """Held out by patient within each source (the usual split): triage per source, and tuberculosis against
    everything else where the source has it."""
    y = _labels(te, classes)
    out = {}
    for src in sorted({r.source for r in te}):
        ii = np.array([r.source == src for r in te])
        m = {"triage": triage_metrics(y[ii], probs[ii], classes, threshold)}
        if "tuberculosis" in classes:
            k = classes.index("tuberculosis")
            pos = y[ii] == k
            if pos.any() and (~pos).any():
                m["tuberculosis_auc"] = float(roc_auc_score(pos, probs[ii][:, k]))
                m["tuberculosis_auc_ci95"] = bootstrap_auc_ci(pos, probs[ii][:, k])
        out[src] = m
    return out


def _labels(records: list[Record], classes: list[str]) -> np.ndarray:
    return np.array([classes.index(r.label) for r in records])


def _fit_predict(recipe: str, feats, classes: list[str], tr, va, te, seed: int):
    """A head of ``recipe`` fitted on ``tr``, its temperature and triage threshold on ``va``: (head, temperature,
    calibrated probs on ``te``, triage threshold)."""
    from .heads import Head

    head = Head(recipe, len(classes), seed=seed).fit(
        feats.of(tr), _labels(tr, classes), [r.source for r in tr], [r.age_group for r in tr])
    t = fit_temperature(head.logits(feats.of(va)), _labels(va, classes))
    # the triage operating point as a card would record it: on the training sources' validation split
    thr = triage_threshold_on(_labels(va, classes), calibrated_probs(head.logits(feats.of(va)), t), classes)
    return head, t, calibrated_probs(head.logits(feats.of(te)), t), thr


def screen(records: list[Record], out: Path, variants: list[str], recipes: list[str], arch: str = "efficientnet_lite0",
           pretrained: str = "imagenet", baseline_model: Path | None = None, seed: int = 0, progress: bool = True) -> dict:
    """LOSO of every (preprocessing variant, head recipe) on frozen features; also each one's in-source
    accuracy, source probe and heatmap share on the lungs. Writes loso.json, loso.md and loso.png."""
    from ..data import lungs
    from .features import extract, variant_spec
    from .probe import source_probe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = [c for c in CLASSES if any(r.label == c for r in records)]
    folds = holdout_groups(records)
    by_path = {r.path: r for r in records}
    masks = [m for m in lungs.load_masks() if m.image in by_path]
    insrc = in_source_split(records, seed)
    insrc = tuple([r for r in insrc if r.split == s] for s in ("train", "val", "test"))
    hashes = image_hashes(records, progress)
    # the same folds for every variant and recipe: split (and search for near-duplicates) once
    splits = {fold: fold_split(records, held, seed=seed, hashes=hashes) for fold, held in folds.items()}
    fold_masks = {fold: [mk for mk in masks if by_path[mk.image].source in held] for fold, held in folds.items()}
    mask_pixels = {mk.image: mk.load() for mk in masks}
    report = {"mode": "screen", "arch": arch, "pretrained": pretrained, "folds": folds, "classes": classes,
              "n": len(records), "sources": dict(Counter(r.source for r in records)), "results": {}}
    for variant in variants:
        spec = variant_spec(variant)
        feats = extract(records, spec, arch, pretrained, map_paths=[m.image for m in masks], cache_dir=out / "cache",
                        progress=progress)
        boxes = lungs.read_boxes([m.image for m in masks], spec)
        linear_probe = None
        for recipe in recipes:
            res = {"variant": variant, "recipe": recipe, "preprocessing": spec.to_dict(), "folds": {}}
            for fold, (tr, va, te) in splits.items():
                head, t, probs, thr = _fit_predict(recipe, feats, classes, tr, va, te, seed)
                # with the threshold set at home: does it hold in the new hospital?
                m = heldout_metrics(_labels(te, classes), probs, classes, thr)
                m["temperature"] = t
                if fold_masks[fold]:
                    paths = [mk.image for mk in fold_masks[fold]]
                    logits = head.logits(feats.of([by_path[p] for p in paths]))
                    cams = head.cam(feats.maps_of(paths), logits.argmax(1))
                    if cams is not None:
                        ms = [mask_pixels[p] for p in paths]
                        m["lung_share"] = lungs.summarize([lungs.lung_share(c, mk, boxes[p]) for c, mk, p in zip(cams, ms, paths)], ms,
                                                         [boxes[p] for p in paths])
                res["folds"][fold] = m
            res["worst_covid19"] = worst_covid(res["folds"])
            res["worst_triage"] = worst_triage(res["folds"])
            # in-source: the same recipe on the usual split of every source
            head, _, probs, thr = _fit_predict(recipe, feats, classes, *insrc, seed)
            te = insrc[2]
            y = _labels(te, classes)
            kerm = np.array([r.source == "kermany" for r in te])
            res["in_source"] = {"run_test_accuracy": float((probs.argmax(1) == y).mean()),
                                "kermany_test_accuracy": float((probs.argmax(1) == y)[kerm].mean()) if kerm.any() else None,
                                "by_source": in_source_by_source(te, probs, classes, thr)}
            if recipe == "adversarial" or linear_probe is None:  # linear heads read the same features: one probe
                probe = source_probe(head.embed(feats.of(records)), [r.label for r in records],
                                     [r.source for r in records], [r.age_group for r in records], seed=seed)
                if recipe != "adversarial":
                    linear_probe = probe
            res["probe"] = probe if recipe == "adversarial" else linear_probe
            report["results"][f"{variant}/{recipe}"] = res
            write_report(report, out)  # a long screen shows its results as they come
            print(f"{variant}/{recipe}: {summary_row(res)}", flush=True)
    if baseline_model is not None:
        report["baseline"] = shipped_checks(Path(baseline_model), records, masks, seed, progress)
    write_report(report, out)
    return report


def shipped_checks(model_path: Path, records: list[Record], masks, seed: int = 0, progress: bool = True) -> dict:
    """The source probe on a served model's embedding and its heatmaps' share on the lungs (what the
    doctor sees). Not held-out numbers: the model has seen every source."""
    from uplink_server.model import Classifier

    from ..data import lungs
    from .evaluate import predict_records
    from .probe import source_probe

    clf = Classifier(model_path)
    rng = np.random.default_rng(seed)
    cells = defaultdict(list)
    for r in records:
        cells[(r.label, r.age_group, r.source)].append(r)
    subset = []
    for rs in cells.values():  # the probe caps each source at 300 per class: predict only those
        subset += [rs[i] for i in rng.permutation(len(rs))[:300]]
    _, emb, _, kept, _ = predict_records(clf, subset, progress=progress)
    out = {"model": str(model_path), "version": clf.version}
    if emb is not None:
        out["probe"] = source_probe(emb, [r.label for r in kept], [r.source for r in kept], [r.age_group for r in kept], seed=seed)
    if masks:
        preds = clf.predict_batch([m.image for m in masks])
        ms = [m.load() for m in masks]
        boxes = lungs.read_boxes([m.image for m in masks], clf.spec)
        out["lung_share"] = lungs.summarize([lungs.lung_share(p.heatmap, mk, boxes[m.image])
                                             for p, mk, m in zip(preds, ms, masks) if p.heatmap is not None], ms,
                                            [boxes[m.image] for m in masks])
    return out


def full(records: list[Record], cfg, out: Path, only: list[str] | None = None, progress: bool = True) -> dict:
    """LOSO with the real fine-tune: ``model_training train`` with ``cfg`` on each fold, tested through the
    server's model loading on the held-out sources."""
    from uplink_server.model import Classifier

    from ..training.train import train
    from .evaluate import predict_records

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = [c for c in CLASSES if any(r.label == c for r in records)]
    folds = holdout_groups(records)
    if only:
        unknown = sorted(set(only) - set(folds))
        if unknown:
            raise ValueError(f"unknown fold(s) {unknown}: the folds of this data are {list(folds)}")
        folds = {f: folds[f] for f in only}
    report = {"mode": "full", "command": cfg.command, "folds": folds, "classes": classes, "results": {"full": {"folds": {}}}}
    hashes = image_hashes(records, progress)
    for fold, held in folds.items():
        run = out / re.sub(r"[^A-Za-z0-9_.+-]", "_", fold)
        run.mkdir(parents=True, exist_ok=True)
        tr, va, te = fold_split(records, held, seed=cfg.seed, hashes=hashes)
        write_manifest(tr + va + te, run / "fold.csv")
        fcfg = replace(cfg, data=[str(run / "fold.csv")], out=str(run / "run"))
        train(fcfg)
        clf = Classifier(run / "run" / "model.onnx")
        logits, _, _, kept, _ = predict_records(clf, te, progress=progress)
        vlogits, _, _, vkept, _ = predict_records(clf, va, progress=progress)
        thr = triage_threshold_on(_labels(vkept, clf.classes), clf.probabilities(vlogits), clf.classes)
        y, probs = _labels(kept, clf.classes), clf.probabilities(logits)
        report["results"]["full"]["folds"][fold] = heldout_metrics(y, probs, clf.classes, thr)
        write_report(report, out)  # each fold as it ends: a fold is an hour on a CPU
    report["results"]["full"]["worst_covid19"] = worst_covid(report["results"]["full"]["folds"])
    report["results"]["full"]["worst_triage"] = worst_triage(report["results"]["full"]["folds"])
    write_report(report, out)
    return report


def served(model_path: Path, records: list[Record], out: Path, progress: bool = True, cascade: bool = True) -> dict:
    """A shipped model on sources it was never trained on, each one a held-out fold: the same numbers as a LOSO
    fold, for a model whose training data simply lacked them (1.5.0 on nih/ and tb/). Sources that the model's
    own splits manifest lists are refused: those are not held out."""
    from uplink_server.model import Classifier

    from ..data.datasets import load_spec, splits_beside
    from .evaluate import predict_records

    clf = Classifier(model_path, cascade=cascade)
    spl = splits_beside(Path(model_path))
    seen = {r.source for r in load_spec(str(spl))} if spl else set()
    overlap = sorted({r.source for r in records} & seen)
    if overlap:
        raise ValueError(f"{model_path} was trained on {', '.join(overlap)}: not held out (use a LOSO fold instead)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folds = {s: [s] for s in sorted({r.source for r in records})}
    card = clf.card
    ev = card.get("evaluation", {})
    res = {"model": str(model_path), "version": clf.version, "folds": {},
           "in_source": {"run_test_accuracy": (ev.get("run_test_split") or {}).get("accuracy"),
                         "kermany_test_accuracy": (ev.get("kermany_official_test") or {}).get("accuracy")}}
    thr = (card.get("triage") or {}).get("threshold")
    for src in folds:
        logits, _, _, kept, _ = predict_records(clf, [r for r in records if r.source == src], progress=progress)
        probs = clf.probabilities(logits)
        known = np.array([r.label in clf.classes for r in kept])
        m = heldout_metrics(_labels([r for r in kept if r.label in clf.classes], clf.classes), probs[known], clf.classes)
        # triage counts every film: one of a class the model does not know (TB for a 3-class model) is abnormal
        # all the same, and calling it normal is the miss a clinic cares about
        y_tri = np.array([clf.classes.index(NORMAL) if r.label == NORMAL else -1 for r in kept])
        m["triage"] = triage_metrics(y_tri, probs, clf.classes, thr)
        m["counts_all"] = dict(Counter(r.label for r in kept))
        res["folds"][src] = m
    res["worst_covid19"] = worst_covid(res["folds"])
    res["worst_triage"] = worst_triage(res["folds"])
    report = {"mode": "served", "folds": folds, "classes": clf.classes, "n": len(records),
              "sources": dict(Counter(r.source for r in records)), "results": {"served": res}}
    write_report(report, out)
    return report


# ---- report ----------------------------------------------------------------------------------------------

def _f(v, nd=3):
    return "n/a" if v is None else f"{v:.{nd}f}"


def _flat(share: dict):
    """What a flat heatmap gets (older reports: the lung area)."""
    return share.get("flat_share", share.get("mean_lung_area"))


def summary_row(res: dict) -> str:
    w = res.get("worst_covid19", {})
    ins = res.get("in_source", {})
    wt = res.get("worst_triage", {})
    return (f"worst held-out COVID AUC {_f(w.get('auc'))} ({w.get('fold', '-')}), sens@spec0.8 {_f(w.get('sensitivity_at_spec'))}; "
            f"worst adult triage AUC {_f(wt.get('auc'))} ({wt.get('fold', '-')}), kermany {_f(wt.get('kermany'))}; "
            f"in-source acc {_f(ins.get('run_test_accuracy'))}, Kermany {_f(ins.get('kermany_test_accuracy'))}; "
            f"probe {_f(res.get('probe', {}).get('balanced_accuracy'), 2)}")


def markdown(report: dict) -> str:
    folds = list(report["folds"])
    lines = ["Held-out groups: " + "; ".join(f"`{f}` ({', '.join(h)})" for f, h in report["folds"].items()), ""]
    head = ["recipe"] + [f"{f}: COVID AUC [95% CI] / sens, spec (served)" for f in folds]
    head += ["worst COVID AUC", "min sens @ spec>=0.80", "in-source acc", "Kermany test acc", "source probe (chance)",
             "heatmap share on lungs"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in report["results"].items():
        row = [f"`{name}`"]
        share = None
        for f in folds:
            m = res["folds"].get(f)
            if m is None:
                row.append("-")
                continue
            c = m.get("covid19", {})
            if c.get("auc") is not None:
                ci = c["auc_ci95"]
                cell = f"{c['auc']:.3f} [{ci[0]:.2f}-{ci[1]:.2f}]{' (few)' if c['few'] else ''} / {_f(c['sensitivity_served'], 2)}, {_f(c['specificity_served'], 2)}"
            else:
                other = ", ".join(f"{k} AUC {v:.3f}" for k, v in m["auc"].items())
                cell = (other or "one class: no AUC") + f"; acc {m['accuracy']:.3f}"
            row.append(cell)
            share = m.get("lung_share") or share
        w = res.get("worst_covid19", {})
        ins = res.get("in_source", {})
        probe = res.get("probe", {})
        row += [_f(w.get("auc")), _f(w.get("sensitivity_at_spec")), _f(ins.get("run_test_accuracy")),
                _f(ins.get("kermany_test_accuracy")),
                f"{_f(probe.get('balanced_accuracy'), 2)} ({_f(probe.get('chance'), 2)})" if probe else "-",
                f"{share['mean_share_in_lungs']:.2f} (flat map {_flat(share):.2f})" if share else "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines += triage_markdown(report)
    b = report.get("baseline")
    if b:
        lines += ["", f"Shipped model {b.get('version')} (trained on every source, so not held out): "
                  f"source probe {_f(b.get('probe', {}).get('balanced_accuracy'), 2)} (chance {_f(b.get('probe', {}).get('chance'), 2)}), "
                  f"heatmap share on the lungs {_f((b.get('lung_share') or {}).get('mean_share_in_lungs'), 2)} "
                  f"(a flat map {_f(_flat(b.get('lung_share') or {}), 2)})."]
    return "\n".join(lines) + "\n"


def _triage_cell(t: dict | None) -> str:
    if not t or t.get("roc_auc") is None:
        return "-"
    ci = t.get("roc_auc_ci95") or [None, None]
    at = (f" / {_f(t.get('sensitivity'), 2)}, {_f(t.get('specificity'), 2)}" if t.get("sensitivity") is not None else "")
    return f"{t['roc_auc']:.3f} [{_f(ci[0], 2)}-{_f(ci[1], 2)}]{' (few)' if t.get('few') else ''}{at}"


def triage_markdown(report: dict) -> list[str]:
    """Abnormal vs normal (1 - p(normal)): held out by source, and by patient within each source."""
    folds = [f for f in report["folds"] if any(r["folds"].get(f, {}).get("triage") for r in report["results"].values())]
    if not folds:
        return []
    src = sorted({s for r in report["results"].values() for s, m in (r.get("in_source", {}).get("by_source") or {}).items()
                  if (m.get("triage") or {}).get("roc_auc") is not None})
    lines = ["", "**Triage (any abnormality vs normal, 1 - p(normal))**: ROC-AUC [95 % CI] / sensitivity, specificity at "
             "the threshold chosen on the training sources' validation split for sensitivity >= 0.95. Held out by source "
             "(trained without it), then held out by patient within each source (the usual split).", ""]
    head = ["recipe"] + [f"held-out source {f}" for f in folds] + [f"worst adult ({', '.join(TRIAGE_SOURCES)})"]
    head += [f"patients held out, {s}" for s in src] + ["TB AUC, Shenzhen patients held out"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in report["results"].items():
        by = res.get("in_source", {}).get("by_source") or {}
        tb = by.get("tb", {})
        row = [f"`{name}`"] + [_triage_cell(res["folds"].get(f, {}).get("triage")) for f in folds]
        row.append(_f((res.get("worst_triage") or {}).get("auc")))
        row += [_triage_cell((by.get(s) or {}).get("triage")) for s in src]
        row.append(f"{tb['tuberculosis_auc']:.3f} [{tb['tuberculosis_auc_ci95'][0]:.2f}-{tb['tuberculosis_auc_ci95'][1]:.2f}]"
                   if tb.get("tuberculosis_auc") is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # COVID-19 AUC where the report has it (the COVID-19 LOSO table), else triage AUC (folds of adult sources)
    for key, label, target in (("covid19", "held-out COVID-19 ROC-AUC", 0.9),
                               ("triage", "held-out triage ROC-AUC (abnormal vs normal)", 0.85)):
        def value(res, f, key=key):
            m = res["folds"].get(f, {}).get(key) or {}
            return m.get("auc", m.get("roc_auc"))

        folds = [f for f in report["folds"] if any(value(res, f) is not None for res in report["results"].values())]
        if folds:
            break
    names = list(report["results"])
    if not folds or not names:
        return
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.25 * len(names) * len(folds))), 4.5))
    width = 0.8 / len(names)
    colours = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        vals = [value(report["results"][name], f) or 0 for f in folds]
        ax.bar(np.arange(len(folds)) + i * width, vals, width, label=name, color=colours(i % 20))
    ax.axhline(target, color="k", ls="--", lw=0.8)
    ax.set_xticks(np.arange(len(folds)) + 0.4 - width / 2, folds, fontsize=8)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel(label)
    ax.set_title("Leave one source out")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    (out / "loso.json").write_text(json.dumps(report, indent=2))
    (out / "loso.md").write_text(markdown(report))
    plot(report, out / "loso.png")


# ---- the model card --------------------------------------------------------------------------------------

CARD_SECTION = "Hospitals it has not seen (leave one source out)"


def card_summary(report: dict, recipe: str, command: str = "") -> dict:
    """What a model card keeps of a LOSO report: the folds of ``recipe`` (the shipped model's recipe), the
    best other recipe and the ship rule between them, the source probes and the heatmap share on the lungs."""
    from ..release.ship_rule import decide

    res = report["results"][recipe]
    keep = ("n", "accuracy", "ece", "counts", "auc", "covid19", "triage", "lung_share")
    others = {k: v for k, v in report["results"].items() if k != recipe and v.get("worst_covid19")}
    best = max(others, key=lambda k: others[k]["worst_covid19"]["auc"]) if others else None
    return {
        "mode": report["mode"], "recipe": recipe, "command": command, "folds": report["folds"],
        "per_fold": {f: {k: m[k] for k in keep if k in m} for f, m in res["folds"].items()},
        "worst_covid19": res.get("worst_covid19"), "worst_triage": res.get("worst_triage"),
        "in_source": res.get("in_source"), "probe": res.get("probe"),
        "shipped_model": report.get("baseline"),
        "best_other": None if best is None else {"recipe": best, "worst_covid19": others[best]["worst_covid19"],
                                                  "in_source": others[best].get("in_source"),
                                                  "probe": others[best].get("probe")},
        "ship_rule": None if best is None else decide({"name": best, **others[best]}, {"name": recipe, **res}),
        # every recipe the rule would let through: on a screen, each is a reason to fine-tune, not to ship
        "passing": sorted(k for k, v in others.items() if decide({"name": k, **v}, {"name": recipe, **res})["ships"]),
    }


MODE_TITLES = {"full": "Fine-tuned folds", "screen": "The fast screen (frozen ImageNet features, a linear head)",
               "served": "The served model, never trained on the held-out source"}


def card_markdown(ext: dict) -> str:
    """The card's LOSO section: ``ext`` (the latest run), then the runs of other modes it keeps (a fine-tuned run of
    two folds does not erase a screen of every source)."""
    text = _mode_markdown(ext)
    for mode, sub in (ext.get("other_modes") or {}).items():
        text += f"\n### {MODE_TITLES.get(mode, mode)}\n\n" + _mode_markdown(sub)
    return text


def _mode_markdown(ext: dict) -> str:
    how = {"screen": f"screen of the recipe `{ext['recipe']}`: frozen ImageNet features and a linear head, the fast "
                     "screen, not this fine-tuned model itself",
           "full": "each fold fine-tuned with the command below, this model's recipe on a shorter schedule"}
    lines = ["Each source held out in turn: trained on the others, tested on it ("
             + how.get(ext["mode"], f"{ext['mode']} of the recipe `{ext['recipe']}`") + "). "
             "A clinic in Ecuador is such a hospital; the in-source numbers above are not.", "",
             "| held out | images (class: n) | accuracy | ROC-AUC | COVID-19 sens / spec as served | ECE |", "|---|---|---|---|---|---|"]
    for f, m in ext["per_fold"].items():
        aucs = ", ".join(f"{c} {v:.3f}" for c, v in m.get("auc", {}).items()) or "one class: none"
        c = m.get("covid19", {})
        served = f"{_f(c.get('sensitivity_served'), 2)} / {_f(c.get('specificity_served'), 2)}" if c else "-"
        counts = ", ".join(f"{k}: {v}" for k, v in m["counts"].items())
        lines.append(f"| {f} | {counts} | {m['accuracy']:.3f} | {aucs} | {served} | {m['ece']:.3f} |")
    tri = [(f, m["triage"]) for f, m in ext["per_fold"].items() if (m.get("triage") or {}).get("roc_auc") is not None]
    if tri:
        lines += ["", "Triage (any abnormality vs normal) in the held-out hospital: ROC-AUC [95 % CI]; sensitivity and "
                  "specificity at the threshold its training sources' validation split set for sensitivity >= 0.95.", "",
                  "| held out | normal | abnormal | triage ROC-AUC [95 % CI] / sens, spec |", "|---|---|---|---|"]
        lines += [f"| {f} | {t.get('normal')} | {t.get('abnormal')} | {_triage_cell(t)} |" for f, t in tri]
        wt = ext.get("worst_triage") or {}
        kids = f"; children (kermany held out): {_f(wt['kermany'])}" if wt.get("kermany") is not None else ""
        lines += ["", f"- Worst held-out adult triage ROC-AUC ({', '.join(wt.get('among') or TRIAGE_SOURCES)}): "
                  f"{_f(wt.get('auc'))} ({wt.get('fold', '-')}; target 0.85){kids}."]
    w = ext.get("worst_covid19") or {}
    if w.get("auc") is not None:  # runs without a COVID-19 fold (the adult triage folds) have nothing to say here
        lines += ["", f"- Worst held-out COVID-19 ROC-AUC: {_f(w.get('auc'))} ({w.get('fold', '-')}); lowest sensitivity at "
                     f"specificity >= 0.80: {_f(w.get('sensitivity_at_spec'))} (targets 0.90 and 0.90)."]
    if ext.get("note"):
        lines.append(f"- {ext['note']}")
    probe = ext.get("probe") or {}
    if probe:
        lines.append(f"- Source probe on the recipe's embedding (label and age group held fixed): balanced accuracy "
                     f"{_f(probe.get('balanced_accuracy'), 2)}, chance {_f(probe.get('chance'), 2)}.")
    shipped = ext.get("shipped_model") or {}
    if shipped:
        sp, ls = shipped.get("probe") or {}, shipped.get("lung_share") or {}
        lines.append(f"- This model ({shipped.get('version')}): source probe on its embedding {_f(sp.get('balanced_accuracy'), 2)} "
                     f"(chance {_f(sp.get('chance'), 2)}); share of its heatmaps inside the lung masks {_f(ls.get('mean_share_in_lungs'), 2)} "
                     f"on {ls.get('n', 0)} images (a flat map would get {_f(_flat(ls), 2)}).")
    b, rule = ext.get("best_other"), ext.get("ship_rule")
    if b and rule:
        lines.append(f"- Ship rule, best other recipe `{b['recipe']}` against `{ext['recipe']}`: "
                     + ("ships" if rule["ships"] else "does not ship") + " (" + "; ".join(rule["checks"]) + ").")
    if "passing" in ext and rule:
        passing = ", ".join(f"`{k}`" for k in ext["passing"]) or "none"
        lines.append(f"- Every recipe the rule lets through: {passing}"
                     + (" (on the screen: a reason to fine-tune them fold by fold, not yet to ship; BENCHMARKS.md has the "
                        "fine-tuned results)." if ext["mode"] == "screen" and ext["passing"] else "."))
    if ext.get("command"):
        lines.append(f"- Reproduce: `{ext['command']}`")
    if ext.get("plot"):
        lines += ["", f"![held-out ROC-AUC per source, {ext['mode']}]({ext['plot']})"]
    return "\n".join(lines) + "\n"


def keep_other_modes(new: dict, previous: dict | None) -> dict:
    """``new`` with the card's earlier runs of other modes under ``other_modes`` (one per mode, the latest)."""
    previous = dict(previous or {})
    others = dict(previous.pop("other_modes", None) or {})
    if previous.get("mode") and previous["mode"] != new["mode"]:
        others[previous["mode"]] = previous
    others.pop(new["mode"], None)
    return {**new, "other_modes": others} if others else new


def write_to_card(model_path: Path, report: dict, recipe: str, command: str = "", plot: Path | None = None) -> dict:
    """Record the LOSO summary in a model's card (.json, and the section of its .md); ``plot`` (the report's
    loso.png) is copied beside the card."""
    import shutil

    from uplink_server.model import find_card

    from ..release.model_card import markdown_path, replace_section

    card_path = find_card(Path(model_path))
    if card_path is None:
        raise FileNotFoundError(f"no model card beside {model_path}")
    if recipe not in report["results"]:
        raise ValueError(f"the report has no result {recipe!r}: it has {', '.join(report['results'])}")
    card = json.loads(card_path.read_text())
    card["external"] = keep_other_modes(card_summary(report, recipe, command), card.get("external"))
    if plot is not None and Path(plot).is_file():
        # one plot per mode, so the screen's plot stays beside a fine-tuned run's
        suffix = ".loso.png" if report["mode"] == "screen" else f".loso-{report['mode']}.png"
        name = card_path.name.replace(".card.json", suffix).replace("model_card.json", suffix.lstrip("."))
        shutil.copy(plot, card_path.with_name(name))
        card["external"]["plot"] = name
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    md = markdown_path(card_path)
    if md.is_file():
        replace_section(md, CARD_SECTION, card_markdown(card["external"]))
    return card["external"]
