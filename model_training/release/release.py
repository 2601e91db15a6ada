"""Turn a training run into a shipped model in weights/: copy, evaluate on the
official test sets, run the shortcut checks, quantize, write the cards.

    python -m model_training release --run runs/cxr-screen-v1 --name cxr-screen --out weights
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np

from ..data.datasets import DataError, load_spec, write_manifest
from ..evaluation.evaluate import evaluate
from ..evaluation.framing import FACTORS, framing_checks
from .ensemble import ensemble_members
from .model_card import card_markdown
from .quantize import FLOAT_HEAD_CONVS, quantize_model
from .quantize import method as int8_method

INT8_MAX_DROP_POINTS = 0.5


def _rate(m: dict, true_cls: str, pred_cls: str) -> dict:
    classes = m["classes"]
    cm = np.asarray(m["confusion_matrix"])
    i, j = classes.index(true_cls), classes.index(pred_cls)
    n = int(cm[i].sum())
    return {"n": n, "count": int(cm[i, j]), "rate": float(cm[i, j] / n) if n else None}


def shortcut_checks(run_eval: dict, val_eval: dict | None = None) -> tuple[dict, list[str]]:
    """Per source and age group: how often a group is called something for being that group.

    ``val_eval`` (the run's validation metrics) tells a shortcut (the same error
    on validation images of the same source) from a shift between Kermany's
    training and test sets (an error only on the official test).
    """
    src = run_eval["by_source"]
    checks, lines = {}, []

    def add(key, source, t, p, text):
        if source in src and {t, p} <= set(src[source]["classes"]):
            r = _rate(src[source], t, p)
            if r["n"]:
                checks[key] = {"source": source, **r}
                lines.append(f"{text}: {r['count']}/{r['n']} = {r['rate']:.1%}")

    add("adult_normals_called_covid", "radiography", "normal", "covid19", "Adult normals (radiography/, US NIH/RSNA) called COVID-19")
    add("adult_covid_called_normal", "radiography", "covid19", "normal", "Adult COVID-19 (radiography/, mostly Spain) called normal")
    add("children_normal_called_pneumonia", "kermany", "normal", "pneumonia", "Children's normals (Kermany) called pneumonia")
    add("children_called_covid_normal", "kermany", "normal", "covid19", "Children's normals (Kermany) called COVID-19")
    add("children_pneumonia_called_covid", "kermany", "pneumonia", "covid19", "Children's pneumonia (Kermany) called COVID-19")
    val_k = (val_eval or {}).get("by_source", {}).get("kermany")
    if val_k and "children_normal_called_pneumonia" in checks:
        r, t = _rate(val_k, "normal", "pneumonia"), checks["children_normal_called_pneumonia"]
        checks["children_normal_called_pneumonia_val"] = {"source": "kermany", "split": "val", **r}
        lines.append(
            f"Children's normals called pneumonia in validation (a patient-disjoint part of Kermany's training set): {r['count']}/{r['n']} = "
            f"{r['rate']:.1%}" + (". The model does not call children ill for being children on the images it was "
                                  "fitted to; the official test set differs from Kermany's training set, and this "
                                  "data cannot show how much of the gap a new site would see."
                                  if r["rate"] is not None and r["rate"] < t["rate"] / 3 else "."))
    for s in sorted(src):
        if s.startswith("covid/"):
            for t in ("normal", "pneumonia"):
                add(f"{s}_{t}_called_covid", s, t, "covid19", f"Adult {t} from the COVID collection {s} called COVID-19")
    lines.append("Within-source negatives for COVID-19 are scarce (22 normals and 76 other pneumonias in covid/, "
                 "split across train/val/test): the COVID-19 sensitivity/specificity above mostly compares hospitals "
                 "as well as diseases, and the data cannot show how much of it is the disease alone.")
    return checks, lines


def release(run: Path, name: str, out: Path, version: str, quantize: bool = True, progress: bool = True,
            notes: list[str] | None = None, float_head: int = FLOAT_HEAD_CONVS) -> dict:
    """``notes``: why this version, and anything a reader of its numbers must know (shown in the card)."""
    out.mkdir(parents=True, exist_ok=True)
    card = json.loads((run / "model_card.json").read_text())
    card["name"], card["version"] = name, version
    card["release_notes"] = list(notes or [])
    card["ood"]["file"] = f"{name}.ood.npz"
    shutil.copy(run / "model.onnx", out / f"{name}.onnx")
    shutil.copy(run / "ood.npz", out / f"{name}.ood.npz")
    for plot in ("learning_curves.png", "confusion_matrix.png", "roc.png"):
        shutil.copy(run / plot, out / f"{name}.{plot}")
    (out / f"{name}.card.json").write_text(json.dumps(card, indent=2))
    model = out / f"{name}.onnx"
    # the numbers anyone can reproduce with `python -m model_training evaluate`
    public = evaluate(model, ["public"], "auto", progress=progress)
    run_test = evaluate(model, [str(run / "splits.csv")], "test", progress=progress)
    run_metrics = run / "metrics.json"
    val_eval = json.loads(run_metrics.read_text()).get("val") if run_metrics.is_file() else None
    checks, lines = shortcut_checks(run_test, val_eval)
    framing, framing_lines = framing_checks(_framing_evaluations(model, run / "splits.csv", public, progress))
    card["evaluation"] = {
        "kermany_official_test": _strip(public),
        "run_test_split": _strip(run_test),
        "commands": [f"python -m model_training evaluate --model {out}/{name}.onnx --data public",
                     f"python -m model_training evaluate --model {out}/{name}.onnx --data {out}/{name}.splits.csv --split test"],
    }
    split_records = load_spec(str(run / "splits.csv"))
    write_manifest(split_records, out / f"{name}.splits.csv")
    card["shortcut_checks"] = lines + framing_lines
    card["shortcut_check_counts"] = checks
    card["framing_check"] = framing
    card["files"] = {"onnx_mb": round(model.stat().st_size / 1e6, 2)}
    if quantize:
        add_int8(out, name, card, public, run_test, progress, float_head)
    (out / f"{name}.card.json").write_text(json.dumps(card, indent=2))
    (out / f"{name}.card.md").write_text(release_markdown(card, name))
    return card


def _framing_evaluations(model: Path, splits_csv: Path, public: dict, progress: bool) -> dict:
    """Kermany normals as taken and cropped tighter: validation (patient-disjoint part of Kermany's training
    set) and the official test."""
    val = {f: evaluate(model, [str(splits_csv)], "val", progress=progress, zoom=f) for f in (1.0, *FACTORS)}
    test = {1.0: public, **{f: evaluate(model, ["public"], "auto", progress=progress, zoom=f) for f in FACTORS}}
    return {"validation": val, "official test": test}


def add_int8(out: Path, name: str, card: dict, public: dict, run_test: dict, progress: bool = True,
             float_head: int = FLOAT_HEAD_CONVS) -> dict:
    """Quantize ``out/name.onnx`` (calibrated on CALIB_IMAGES of its training images), evaluate the int8 copy on the
    same two test sets as ``public`` and ``run_test`` (the fp32 results), and keep it only within
    INT8_MAX_DROP_POINTS on both. Records the outcome in ``card["int8"]`` either way."""
    splits_csv = out / f"{name}.splits.csv"
    recs = [r for r in load_spec(str(splits_csv)) if r.split == "train"]
    random.Random(0).shuffle(recs)
    q = quantize_model(out / f"{name}.onnx", out / f"{name}.int8.onnx", [r.path for r in recs], float_head=float_head)
    qcard = dict(card, name=f"{name}-int8", format="onnx-int8")
    qcard.pop("int8", None)
    # evaluate finds a model's card beside it
    (out / f"{name}.int8.card.json").write_text(json.dumps(qcard, indent=2))
    q_public = evaluate(q, ["public"], "auto", progress=progress)
    q_test = evaluate(q, [str(splits_csv)], "test", progress=progress)
    qcard["evaluation"] = {
        "kermany_official_test": _strip(q_public), "run_test_split": _strip(q_test),
        "commands": [c.replace(f"{name}.onnx", f"{name}.int8.onnx") for c in card.get("evaluation", {}).get("commands", [])],
    }
    qcard["files"] = {"onnx_mb": round(q.stat().st_size / 1e6, 2)}
    drops = {
        "kermany_official_test": round(100 * (q_public["accuracy"] - public["accuracy"]), 2),
        "run_test_split": round(100 * (q_test["accuracy"] - run_test["accuracy"]), 2),
    }
    qcard["int8_vs_fp32_accuracy_points"] = drops
    agree = {"kermany_official_test": _agreement(public, q_public), "run_test_split": _agreement(run_test, q_test)}
    shipped = all(abs(v) <= INT8_MAX_DROP_POINTS for v in drops.values())
    card["int8"] = {"file": f"{name}.int8.onnx", **drops, "agreement_with_fp32": agree, "mb": qcard["files"]["onnx_mb"],
                    "method": int8_method(float_head, ensemble_members(out / f"{name}.onnx")), "shipped": shipped}
    if shipped:
        qcard["int8"] = card["int8"]
        (out / f"{name}.int8.card.json").write_text(json.dumps(qcard, indent=2))
        (out / f"{name}.int8.card.md").write_text(release_markdown(qcard, name))
    else:  # an int8 model that disagrees with fp32 is not worth its speed
        q.unlink()
        (out / f"{name}.int8.card.json").unlink(missing_ok=True)
        (out / f"{name}.int8.card.md").unlink(missing_ok=True)
    return card["int8"]


def release_int8(out: Path, name: str, progress: bool = True, float_head: int = FLOAT_HEAD_CONVS) -> dict:
    """(Re)make the int8 copy of an already shipped model and update its cards."""
    missing = [f.name for f in (out / f"{name}.onnx", out / f"{name}.card.json", out / f"{name}.splits.csv") if not f.is_file()]
    if missing:
        raise DataError(f"no shipped model '{name}' in {out}: missing {', '.join(missing)} "
                        "(release one with `python -m model_training release` first)")
    card = json.loads((out / f"{name}.card.json").read_text())
    model = out / f"{name}.onnx"
    # fp32 again, not the card's numbers: the agreement needs its per-image predictions
    public = evaluate(model, ["public"], "auto", progress=progress)
    run_test = evaluate(model, [str(out / f"{name}.splits.csv")], "test", progress=progress)
    info = add_int8(out, name, card, public, run_test, progress, float_head)
    (out / f"{name}.card.json").write_text(json.dumps(card, indent=2))
    (out / f"{name}.card.md").write_text(release_markdown(card, name))
    return info


def _agreement(a: dict, b: dict) -> float | None:
    pa, pb = a.get("predictions"), b.get("predictions")
    if not pa or not pb or len(pa) != len(pb):
        return None
    return round(float(np.mean([x["predicted"] == y["predicted"] for x, y in zip(pa, pb)])), 4)


def _strip(res: dict) -> dict:
    keep = ("n", "accuracy", "loss", "f1_macro", "roc_auc_macro", "ece", "per_class", "confusion_matrix", "classes",
            "normal_vs_abnormal", "covid19_vs_rest", "ood_refusal_rate", "data")
    out = {k: res[k] for k in keep if k in res}
    out["by_source"] = {s: {k: m[k] for k in ("n", "accuracy", "confusion_matrix")} for s, m in res["by_source"].items()}
    return out


def release_markdown(card: dict, name: str) -> str:
    md = card_markdown(card).replace("![learning curves](learning_curves.png) ![confusion matrix](confusion_matrix.png) ![ROC](roc.png)",
                                     f"![learning curves]({name}.learning_curves.png) ![confusion matrix]({name}.confusion_matrix.png) ![ROC]({name}.roc.png)")
    ev = card.get("evaluation", {})
    notes = card.get("release_notes") or []
    lines = ["", "## Release notes", "", *[f"- {n}" for n in notes]] if notes else []
    lines += ["", "## Reproducible evaluation", ""]
    for key, title in (("kermany_official_test", "Kermany official test (624 children; normal vs pneumonia)"),
                       ("run_test_split", "Patient-disjoint test split of the training run (all sources)")):
        if key not in ev:
            continue
        e = ev[key]
        lines.append(f"**{title}**: n={e['n']}, accuracy {e['accuracy']:.4f}, F1 macro {e['f1_macro']:.4f}, "
                     f"ROC-AUC macro {e['roc_auc_macro'] if e['roc_auc_macro'] is None else round(e['roc_auc_macro'], 4)}, ECE {e['ece']:.4f}")
        if "normal_vs_abnormal" in e:
            op = e["normal_vs_abnormal"]
            lines.append(f"- normal vs abnormal: accuracy {op['accuracy_at_0.5']:.4f}, ROC-AUC {op['roc_auc']:.4f}")
        if "covid19_vs_rest" in e and e["covid19_vs_rest"].get("roc_auc") is not None:
            op = e["covid19_vs_rest"]
            lines.append(f"- COVID-19 vs rest: ROC-AUC {op['roc_auc']:.4f}; sensitivity {op['sensitivity']:.4f} at specificity {op['specificity']:.4f}")
        if "ood_refusal_rate" in e:
            lines.append(f"- real X-rays the gate would refuse: {e['ood_refusal_rate']:.2%}")
        lines.append("")
    lines += [f"Reproduce: `{c}`" for c in ev.get("commands", [])]
    if "int8" in card:
        q = card["int8"]
        change = (f"accuracy change vs fp32 {q['kermany_official_test']:+.2f} points (Kermany test), "
                  f"{q['run_test_split']:+.2f} points (run test split)")
        lines += ["", f"**int8 variant** `{q['file']}` ({q['mb']} MB): {change}." if q.get("shipped", True) else
                  f"**int8 variant not shipped** ({q.get('method', 'static QDQ')}): {change}, beyond the "
                  f"{INT8_MAX_DROP_POINTS} point limit."]
        if q.get("agreement_with_fp32"):
            a = q["agreement_with_fp32"]
            lines.append(f"Same class as fp32 on {a['kermany_official_test']:.1%} (Kermany test) and "
                         f"{a['run_test_split']:.1%} (run test split) of the images.")
    weights = "int8 weights" if card.get("format") == "onnx-int8" else "float32 arithmetic"
    lines += ["", f"File size: {card['files']['onnx_mb']} MB (ONNX, {weights})", ""]
    return md + "\n".join(lines)
