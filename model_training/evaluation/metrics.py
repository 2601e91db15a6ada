"""Classification metrics per split and per data source (scikit-learn)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from .calibration import expected_calibration_error


def _safe_auc(y_bin: np.ndarray, score: np.ndarray) -> float | None:
    if y_bin.min() == y_bin.max():
        return None  # AUC is undefined with one class present
    return float(roc_auc_score(y_bin, score))


def compute_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """All the study's metrics and more for integer labels ``y`` and probabilities."""
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    pred = probs.argmax(axis=1)
    labels = list(range(k))
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y, pred, labels=labels)
    per_class = {}
    aucs = []
    for i, c in enumerate(classes):
        tn = cm.sum() - cm[i, :].sum() - cm[:, i].sum() + cm[i, i]
        fp = cm[:, i].sum() - cm[i, i]
        auc = _safe_auc((y == i).astype(int), probs[:, i])
        if auc is not None:
            aucs.append(auc)
        per_class[c] = {
            "precision": float(prec[i]),
            "recall": float(rec[i]),  # = sensitivity
            "sensitivity": float(rec[i]),
            "specificity": float(tn / (tn + fp)) if (tn + fp) else None,
            "f1": float(f1[i]),
            "roc_auc": auc,
            "support": int(support[i]),
        }
    present = [i for i in labels if support[i] > 0]
    p = np.clip(probs, 1e-12, 1)
    p = p / p.sum(axis=1, keepdims=True)
    return {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "loss": float(log_loss(y, p, labels=labels)),
        "precision_macro": float(np.mean([prec[i] for i in present])) if present else None,
        "recall_macro": float(np.mean([rec[i] for i in present])) if present else None,
        "f1_macro": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)) if present else None,
        "roc_auc_macro": float(np.mean(aucs)) if aucs else None,
        "ece": expected_calibration_error(probs, y),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }


def metrics_by_group(y, probs, classes, groups: list[str]) -> dict:
    """The same metrics on each subset sharing a group value (source, age group)."""
    idx = defaultdict(list)
    for i, g in enumerate(groups):
        idx[g or "unknown"].append(i)
    y, probs = np.asarray(y), np.asarray(probs)
    return {g: compute_metrics(y[ii], probs[ii], classes) for g, ii in sorted(idx.items())}


def bootstrap_auc_ci(y: np.ndarray, s: np.ndarray, n: int = 400, seed: int = 0) -> list[float]:
    """95 % interval of the ROC-AUC of scores ``s`` for binary ``y``, resampling positives and negatives apart."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y).astype(bool)
    s = np.asarray(s)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    aucs = [roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))],
                          np.r_[s[rng.choice(pos, len(pos))], s[rng.choice(neg, len(neg))]]) for _ in range(n)]
    return [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))]


def binary_operating_point(y_pos: np.ndarray, score: np.ndarray, min_specificity: float = 0.95) -> dict:
    """Sensitivity at the threshold giving at least ``min_specificity`` (e.g. COVID-19 vs rest)."""
    from sklearn.metrics import roc_curve

    y_pos = np.asarray(y_pos).astype(int)
    if y_pos.min() == y_pos.max():
        return {"n": int(len(y_pos)), "roc_auc": None, "note": "one class only"}
    fpr, tpr, thr = roc_curve(y_pos, score)
    ok = (1 - fpr) >= min_specificity
    best = int(np.argmax(np.where(ok, tpr, -1)))
    return {
        "n": int(len(y_pos)),
        "positives": int(y_pos.sum()),
        "roc_auc": float(roc_auc_score(y_pos, score)),
        "min_specificity": min_specificity,
        "threshold": float(thr[best]),
        "sensitivity": float(tpr[best]),
        "specificity": float(1 - fpr[best]),
    }


def summary_line(m: dict) -> str:
    auc = m.get("roc_auc_macro")
    return (
        f"n={m['n']} acc={m['accuracy']:.4f} loss={m['loss']:.4f} f1_macro={m['f1_macro'] or 0:.4f} "
        f"auc_macro={auc if auc is None else round(auc, 4)} ece={m['ece']:.4f}"
    )


def split_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str], records) -> dict:
    """compute_metrics plus the same per source and per age group (the shortcut tables of a card)."""
    out = compute_metrics(y, probs, classes)
    out["by_source"] = metrics_by_group(y, probs, classes, [r.source for r in records])
    out["by_age_group"] = metrics_by_group(y, probs, classes, [r.age_group for r in records])
    return out


def calibrate_and_report(outputs: dict, by_split: dict, classes: list[str], out: Path) -> tuple[dict, dict]:
    """What a run (or an ensemble) leaves from its raw logits ``outputs`` = {split: (logits, y)}: temperature
    fitted on validation, metrics per split, source and age group (``metrics.json``), and the confusion matrix
    and ROC of the test split (validation without one). Returns (calibration, metrics)."""
    from . import plots
    from .calibration import calibrate, calibrated_probs

    calibration = calibrate(*outputs["val"], outputs.get("test"))
    t = calibration["temperature"]
    metrics = {}
    for s, (lg, y) in outputs.items():
        metrics[s] = split_metrics(y, calibrated_probs(lg, t), classes, by_split[s])
        print(f"{s}: {summary_line(metrics[s])}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    final = "test" if "test" in metrics else "val"
    plots.confusion(metrics[final]["confusion_matrix"], classes, out / "confusion_matrix.png", f"{final} split")
    lg, y = outputs[final]
    plots.roc(y, calibrated_probs(lg, t), classes, out / "roc.png", f"ROC, {final} split")
    return calibration, metrics
