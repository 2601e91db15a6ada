"""Choosing the uncertainty rule on validation data (see uplink_server.uncertainty).

The margin threshold is the smallest one at which the results *not* flagged
make at most ``target_error`` mistakes on the validation split; the card then
states what that costs: the share of results sent to review, and the error
rates of both groups.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from uplink_server.uncertainty import margin

from ..release.model_card import record_in_card


def fit_margin_rule(probs: np.ndarray, labels: np.ndarray, target_error: float = 0.02) -> dict:
    """probs (N, C) as served (calibrated), labels (N,) class indices."""
    if not 0 < target_error < 1:
        raise ValueError("target_error must be between 0 and 1")
    if len(probs) == 0:
        raise ValueError("no validation images to choose the rule on")
    m = np.array([margin(p) for p in probs])
    wrong = probs.argmax(1) != labels
    # candidate thresholds: 0 and every observed margin (flag everything below it)
    best = None
    for t in np.concatenate([[0.0], np.unique(m)]):
        confident = m >= t
        err = float(wrong[confident].mean()) if confident.any() else 0.0
        if err <= target_error:
            best = float(t)
            break
    if best is None:  # never happens: flagging everything leaves no confident errors
        best = float(m.max()) + 1e-6
    flagged = m < best
    return {
        "rule": "margin", "threshold": round(best, 4), "target_error": target_error,
        "chosen_on": "validation split",
        "validation": {
            "n": int(len(m)), "share_uncertain": round(float(flagged.mean()), 4),
            "error_confident": round(float(wrong[~flagged].mean()) if (~flagged).any() else 0.0, 4),
            "error_uncertain": round(float(wrong[flagged].mean()) if flagged.any() else 0.0, 4),
            "error_all": round(float(wrong.mean()), 4),
        },
    }


def choose(model_path: Path, data: str | None, target_error: float, write_card: bool, progress: bool = True) -> dict:
    from .evaluate import predict_validation

    clf, logits, kept = predict_validation(model_path, data, progress)
    labels = np.array([clf.classes.index(r.label) for r in kept])
    rule = fit_margin_rule(clf.probabilities(logits), labels, target_error)
    if write_card:
        record_in_card(model_path, "uncertainty", rule, "Uncertainty rule", describe(rule))
    return rule


def describe(rule: dict) -> str:
    v = rule["validation"]
    return (f"Uncertain when the top probability leads the runner-up by less than {rule['threshold']:.3f} "
            f"(chosen on the {rule['chosen_on']} for at most {rule['target_error']:.1%} errors among confident results): "
            f"{v['share_uncertain']:.1%} of {v['n']} validation images flagged; error {v['error_confident']:.2%} among "
            f"confident results, {v['error_uncertain']:.1%} among flagged ones ({v['error_all']:.2%} overall).")
