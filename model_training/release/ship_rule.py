"""The ship rule: a new default model ships only if it holds better in hospitals it has never seen.

The headline criterion is the worst held-out-source *triage* ROC-AUC (any abnormality vs normal, over the adult
sources with both from one hospital: nih, tb) when both results have one; otherwise the worst held-out-source
COVID-19 ROC-AUC, as before 2.0.0 (leave one source out, :mod:`.external`). Either way the candidate's in-source
accuracies (the run's test split, the Kermany official test) may be at most ``tolerance`` worse. With the
candidate's model card (``--candidate-model``) the issue's targets are checked too, and its in-source accuracies
come from that card (the fine-tuned model, not a screen's head). Missing numbers fail the rule: nothing ships on
an unmeasured claim.
"""

from __future__ import annotations

import json
from pathlib import Path

TOLERANCE = 0.01  # one accuracy point
IN_SOURCE = ("run_test_accuracy", "kermany_test_accuracy")

# The 2.0.0 issue's targets, read from a model card (triage section, evaluation) and the LOSO result.
TRIAGE_AUC_HELD_OUT_PATIENTS = {"nih": 0.88, "tb": 0.90, "kermany": 0.97}
WORST_ADULT_LOSO_TRIAGE_AUC = 0.85
MIN_SENSITIVITY = 0.95
COVID_AUC_IN_SPLITS = 0.95
KERMANY_TEST_ACCURACY = 0.92


def load_result(ref: str) -> dict:
    """``PATH`` (a loso.json with one result) or ``PATH#NAME`` (one result of a screen, e.g. plain/group)."""
    path, _, name = ref.partition("#")
    report = json.loads(Path(path).read_text())
    results = report["results"]
    if not name:
        if len(results) != 1:
            raise ValueError(f"{path} holds {len(results)} results: name one as {path}#NAME ({', '.join(results)})")
        name = next(iter(results))
    if name not in results:
        raise ValueError(f"{path} has no result {name!r}: it has {', '.join(results)}")
    return {"name": f"{path}#{name}", **results[name]}


def card_in_source(card: dict) -> dict:
    """In-source accuracies of a released model from its card's reproducible evaluation."""
    ev = card.get("evaluation", {})
    return {"run_test_accuracy": (ev.get("run_test_split") or {}).get("accuracy"),
            "kermany_test_accuracy": (ev.get("kermany_official_test") or {}).get("accuracy")}


def target_checks(card: dict, candidate: dict) -> list[tuple[str, bool]]:
    """(text, passed) for each target of the 2.0.0 issue."""
    out = []
    held = next(iter((card.get("triage") or {}).get("held_out", {}).values()), None)
    for src, goal in TRIAGE_AUC_HELD_OUT_PATIENTS.items():
        m = (held or {}).get("by_source", {}).get(src) or {}
        auc = m.get("roc_auc")
        if src == "kermany":  # the official test split: held-out children
            kt = (card.get("triage") or {}).get("held_out", {}).get("Kermany official test") or {}
            auc = kt.get("roc_auc", auc)
        out.append((f"triage AUC on held-out {src} patients {_f(auc)} (target >= {goal})", auc is not None and auc >= goal))
    for src, m in sorted(((held or {}).get("by_source") or {}).items()):
        if m.get("abnormal"):
            sens = m.get("sensitivity")
            out.append((f"sensitivity at the card's threshold, held-out {src} patients {_f(sens)} (target >= {MIN_SENSITIVITY})",
                        sens is not None and sens >= MIN_SENSITIVITY))
    wt = (candidate.get("worst_triage") or {}).get("auc")
    out.append((f"worst held-out adult source triage AUC {_f(wt)} (target >= {WORST_ADULT_LOSO_TRIAGE_AUC})",
                wt is not None and wt >= WORST_ADULT_LOSO_TRIAGE_AUC))
    ev = card.get("evaluation", {})
    cov = ((ev.get("run_test_split") or {}).get("covid19_vs_rest") or {}).get("roc_auc")
    out.append((f"COVID-19 AUC in our test split {_f(cov)} (target >= {COVID_AUC_IN_SPLITS})", cov is not None and cov >= COVID_AUC_IN_SPLITS))
    acc = (ev.get("kermany_official_test") or {}).get("accuracy")
    out.append((f"Kermany official test accuracy {_f(acc)} (target >= {KERMANY_TEST_ACCURACY})", acc is not None and acc >= KERMANY_TEST_ACCURACY))
    return out


def _f(v):
    return "n/a" if v is None else f"{v:.3f}"


def decide(candidate: dict, baseline: dict, tolerance: float = TOLERANCE, card: dict | None = None) -> dict:
    checks, ok = [], True
    key, what = (("worst_triage", "adult triage") if candidate.get("worst_triage") or baseline.get("worst_triage")
                 else ("worst_covid19", "COVID-19"))
    ca, ba = (candidate.get(key) or {}).get("auc"), (baseline.get(key) or {}).get("auc")
    if ca is None or ba is None:
        checks.append(f"worst held-out {what} AUC missing: fails")
        ok = False
    else:
        passed = ca > ba
        ok &= passed
        checks.append(f"worst held-out {what} AUC {ca:.3f} vs {ba:.3f}: {'beats' if passed else 'does not beat'} it")
    if key == "worst_triage":  # reported, not required: the triage question comes first
        cc, bc = (candidate.get("worst_covid19") or {}).get("auc"), (baseline.get("worst_covid19") or {}).get("auc")
        checks.append(f"(for information) worst held-out COVID-19 AUC {_f(cc)} vs {_f(bc)}")
    cand_in = card_in_source(card) if card else candidate.get("in_source", {})
    for k in IN_SOURCE:
        c, b = cand_in.get(k), baseline.get("in_source", {}).get(k)
        if c is None or b is None:
            checks.append(f"{k} missing: fails")
            ok = False
            continue
        passed = c >= b - tolerance
        ok &= passed
        checks.append(f"{k} {c:.3f} vs {b:.3f}: {'within' if passed else 'more than'} {tolerance * 100:.0f} point(s)"
                      f"{'' if passed else ' worse'}")
    targets = []
    if card is not None:
        targets = target_checks(card, candidate)
        for text, passed in targets:
            ok &= passed
            checks.append(("target met: " if passed else "target missed: ") + text)
    return {"ships": bool(ok), "candidate": candidate.get("name"), "baseline": baseline.get("name"), "checks": checks,
            "targets_met": sum(p for _, p in targets), "targets": len(targets)}


# A cheaper model of the same task (distilled, int8, pruned: trained on the default's split and data) replaces the
# default when it answers as well, not better: the int8 parity limit in source, calibration and unseen hospitals
# held within a little, and the framing check the shipped-model tests assert.
PARITY_ACCURACY = 0.005
PARITY_ECE = 0.01
PARITY_UNSEEN_TRIAGE_AUC = 0.02
PARITY_FRAMING_RATE = 0.05


def parity(candidate: dict, baseline: dict, candidate_card: dict, baseline_card: dict) -> dict:
    """Does a cheaper model answer as well as the default? ``candidate``/``baseline``: their ``external --mode served``
    results on the same sources that neither was trained on; the cards give in-source accuracy, ECE and framing."""
    checks, ok = [], True

    def check(text: str, passed: bool) -> None:
        nonlocal ok
        ok &= passed
        checks.append(text + ("" if passed else ": fails"))

    c_in, b_in = card_in_source(candidate_card), card_in_source(baseline_card)
    for k in IN_SOURCE:
        c, b = c_in.get(k), b_in.get(k)
        check(f"{k} {_f(c)} vs {_f(b)} (at most {PARITY_ACCURACY * 100:g} point(s) lower)",
              c is not None and b is not None and c >= b - PARITY_ACCURACY - 1e-12)
    c, b = ((card.get("calibration") or {}).get("ece_test_after") for card in (candidate_card, baseline_card))
    check(f"test ECE {_f(c)} vs {_f(b)} (at most {PARITY_ECE} higher)", c is not None and b is not None and c <= b + PARITY_ECE)
    folds = sorted(f for f, m in (baseline.get("folds") or {}).items() if (m.get("triage") or {}).get("roc_auc") is not None)
    check(f"unseen sources with a triage AUC: {', '.join(folds) or 'none'}", bool(folds))
    for f in folds:
        c = ((candidate.get("folds") or {}).get(f, {}).get("triage") or {}).get("roc_auc")
        b = baseline["folds"][f]["triage"]["roc_auc"]
        check(f"triage AUC on unseen {f} {_f(c)} vs {_f(b)} (at most {PARITY_UNSEEN_TRIAGE_AUC} lower)",
              c is not None and c >= b - PARITY_UNSEEN_TRIAGE_AUC)
    rate = (((candidate_card.get("framing_check") or {}).get("validation") or {}).get("1.4") or {}).get("rate")
    check(f"healthy children framed 1.4x tighter called abnormal {_f(rate)} (below {PARITY_FRAMING_RATE})",
          rate is not None and rate < PARITY_FRAMING_RATE)
    return {"ships": bool(ok), "rule": "parity", "candidate": candidate.get("name"), "baseline": baseline.get("name"),
            "checks": checks}
