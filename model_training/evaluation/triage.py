"""Choosing the triage operating point on validation data (see uplink_server.triage).

The score is 1 - p(normal). The threshold is the highest one at which at least ``target`` of the abnormal
validation films (any class but normal) score at or above it, in the validation split as a whole *and* in
every source with at least ``MIN_ABNORMAL`` abnormal validation films: one threshold for every hospital, set
by the one where the model is least sure. The card then reports how it did on held-out patients of each
source (the test split; Kermany's official test): ROC-AUC with its bootstrap interval, sensitivity and
specificity at the threshold.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..data.labels import NORMAL
from ..release.model_card import record_in_card
from .metrics import bootstrap_auc_ci

TARGET_SENSITIVITY = 0.95
MIN_ABNORMAL = 10  # fewer abnormal validation films in a source: too few to set a threshold by


def triage_scores(probs: np.ndarray, classes: list[str]) -> np.ndarray:
    return 1.0 - np.asarray(probs)[:, list(classes).index(NORMAL)]


def threshold_for_sensitivity(scores: np.ndarray, abnormal: np.ndarray, target: float) -> float:
    """The highest threshold t with mean(scores[abnormal] >= t) >= target."""
    pos = np.sort(np.asarray(scores)[np.asarray(abnormal, bool)])
    if len(pos) == 0:
        raise ValueError("no abnormal films to set a triage threshold on")
    # at most floor((1 - target) * n) positives may fall below t
    k = int(np.floor((1 - target) * len(pos) + 1e-9))
    return float(pos[k])


def operating_point(scores: np.ndarray, abnormal: np.ndarray, threshold: float | None) -> dict:
    """Counts and ROC-AUC with its bootstrap interval; with a ``threshold``, sensitivity, specificity and the share
    flagged at it too."""
    scores, abnormal = np.asarray(scores), np.asarray(abnormal, bool)
    out = {"n": int(len(scores)), "abnormal": int(abnormal.sum()), "normal": int((~abnormal).sum())}
    if threshold is not None:
        flagged = scores >= threshold
        out.update(sensitivity=float(flagged[abnormal].mean()) if abnormal.any() else None,
                   specificity=float((~flagged[~abnormal]).mean()) if (~abnormal).any() else None,
                   share_flagged=float(flagged.mean()) if len(flagged) else None)
    if abnormal.any() and (~abnormal).any():
        from sklearn.metrics import roc_auc_score

        out["roc_auc"] = float(roc_auc_score(abnormal, scores))
        out["roc_auc_ci95"] = bootstrap_auc_ci(abnormal, scores)
    return out


def per_source(scores, abnormal, sources, threshold: float) -> dict:
    idx = defaultdict(list)
    for i, s in enumerate(sources):
        idx[s or "unknown"].append(i)
    scores, abnormal = np.asarray(scores), np.asarray(abnormal, bool)
    return {s: operating_point(scores[ii], abnormal[ii], threshold) for s, ii in sorted(idx.items())}


def fit_triage(probs: np.ndarray, labels: np.ndarray, classes: list[str], sources: list[str],
               target: float = TARGET_SENSITIVITY) -> dict:
    """probs (N, C) as served (calibrated), labels (N,) class indices, sources (N,) on the validation split."""
    if not 0 < target < 1:
        raise ValueError("target sensitivity must be between 0 and 1")
    scores = triage_scores(probs, classes)
    abnormal = np.asarray(labels) != list(classes).index(NORMAL)
    candidates = {"all": threshold_for_sensitivity(scores, abnormal, target)}
    for s in sorted(set(sources)):
        m = np.array([x == s for x in sources]) & abnormal
        if m.sum() >= MIN_ABNORMAL:
            candidates[s] = threshold_for_sensitivity(scores, m, target)
    binding = min(candidates, key=candidates.get)
    # rounded down for the card: rounding up could put the film that sets the threshold below it
    t = math.floor(candidates[binding] * 1e6) / 1e6
    return {
        "score": "1 - p(normal)", "threshold": t, "target_sensitivity": target,
        "chosen_on": "validation split", "binding_source": binding,
        "thresholds_by_source": {k: math.floor(v * 1e6) / 1e6 for k, v in candidates.items()},
        "validation": {**operating_point(scores, abnormal, t), "by_source": per_source(scores, abnormal, sources, t)},
    }


def evaluate_triage(probs: np.ndarray, labels: np.ndarray, classes: list[str], sources: list[str], threshold: float) -> dict:
    """The triage rule on another split (held-out patients): overall and per source."""
    scores = triage_scores(probs, classes)
    abnormal = np.asarray(labels) != list(classes).index(NORMAL)
    return {**operating_point(scores, abnormal, threshold), "by_source": per_source(scores, abnormal, sources, threshold)}


def choose(model_path: Path, data: str | None, target: float, write_card: bool, progress: bool = True,
           extra_tests: dict[str, str] | None = None) -> dict:
    """Fit the rule on the model's validation split, report it on its test split (held-out patients) and on
    ``extra_tests`` ({name: data spec}, e.g. Kermany's official test), and write both into the card."""
    from ..data.datasets import load_spec, splits_beside
    from .evaluate import predict_records, predict_validation

    clf, logits, kept = predict_validation(model_path, data, progress)
    if NORMAL not in clf.classes:
        raise ValueError(f"the model has no {NORMAL!r} class: triage needs one")
    labels = np.array([clf.classes.index(r.label) for r in kept])
    rule = fit_triage(clf.probabilities(logits), labels, clf.classes, [r.source for r in kept], target)
    spec = data or splits_beside(Path(model_path))
    tests = {"test split (held-out patients)": [r for r in load_spec(str(spec)) if r.split == "test"]}
    for name, s in (extra_tests or {}).items():
        recs = load_spec(s)
        tests[name] = [r for r in recs if r.split == "test"] or recs
    rule["held_out"] = {}
    for name, recs in tests.items():
        recs = [r for r in recs if r.label in clf.classes]
        if not recs:
            continue
        lg, _, _, kept_t, _ = predict_records(clf, recs, progress=progress)
        y = np.array([clf.classes.index(r.label) for r in kept_t])
        rule["held_out"][name] = evaluate_triage(clf.probabilities(lg), y, clf.classes, [r.source for r in kept_t],
                                                 rule["threshold"])
    if write_card:
        record_in_card(Path(model_path), "triage", rule, "Triage", describe(rule))
    return rule


def _pct(v):
    return "n/a" if v is None else f"{v:.1%}"


def describe(rule: dict) -> str:
    v = rule["validation"]
    lines = [
        f"A film **needs a doctor's read** when {rule['score']} >= {rule['threshold']:.4f}. The threshold was chosen on the "
        f"{rule['chosen_on']} for sensitivity >= {rule['target_sensitivity']:.0%} for any abnormality, overall and in every "
        f"source with at least {MIN_ABNORMAL} abnormal validation films; the binding one was `{rule['binding_source']}`. "
        f"Validation: sensitivity {_pct(v['sensitivity'])}, specificity {_pct(v['specificity'])}, {_pct(v['share_flagged'])} "
        f"of {v['n']} films flagged.", ""]
    for name, res in rule.get("held_out", {}).items():
        lines += [f"**{name}**", "", "| source | normal | abnormal | ROC-AUC [95 % CI] | sensitivity | specificity |",
                  "|---|---|---|---|---|---|"]
        for src, m in [("all", res), *res["by_source"].items()]:
            auc = (f"{m['roc_auc']:.3f} [{m['roc_auc_ci95'][0]:.3f}-{m['roc_auc_ci95'][1]:.3f}]"
                   if m.get("roc_auc") is not None else "n/a (one class)")
            lines.append(f"| {src} | {m['normal']} | {m['abnormal']} | {auc} | {_pct(m['sensitivity'])} | {_pct(m['specificity'])} |")
        lines.append("")
    return "\n".join(lines)
