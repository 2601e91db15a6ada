"""Local recalibration: the temperature and the uncertainty margin refitted on this site's reviewed cases.

A model can be over- or under-confident in a hospital it has not seen. Once enough cases have a doctor's
reading, half of them (stratified by reading, seeded) fit a temperature on the model's own probabilities and a
new margin rule; the other half checks it (log loss, ECE, share flagged uncertain, errors among results not
flagged) before and after. An admin previews that, applies it as a new version, and can roll it back. The
class ranking never changes (a temperature keeps the order); each result records the version it used.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from model_training.data.labels import CLASSES
from model_training.evaluation.calibration import calibrated_probs, expected_calibration_error, fit_temperature, nll
from model_training.evaluation.uncertainty import fit_margin_rule
from uplink_server.uncertainty import margin

from .db import Case, SiteCalibration, User, utcnow
from .reviews import latest_reviews, model_key

MIN_PER_CLASS = 20  # reviewed cases of each class the doctors read, at least two classes
TARGET_ERROR = 0.02  # as the model card's rule: at most 2 % errors among results not flagged
SEED = 0


class CalibrationError(ValueError):
    """Why a recalibration cannot be previewed, applied or rolled back; ``code`` is translated (``cal_<code>``)."""

    def __init__(self, code: str, message: str, status: int = 422):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def active(db: Session, model: str) -> SiteCalibration | None:
    return db.scalar(select(SiteCalibration).where(SiteCalibration.model == model, SiteCalibration.active))


def current_threshold(db: Session, model: str, local=None) -> float:
    """The margin rule that results of ``model`` get now: the active site calibration's, else its card's (known
    when ``local``, the web app's own classifier, is that model)."""
    cal = active(db, model)
    if cal is not None:
        return cal.margin_threshold
    if local is not None and model_key(local.name, local.version) == model:
        return local.uncertainty.threshold
    return 0.0


def versions(db: Session, model: str) -> list[SiteCalibration]:
    return list(db.scalars(select(SiteCalibration).where(SiteCalibration.model == model).order_by(SiteCalibration.version.desc())))


def apply_to(probabilities: dict, cal: SiteCalibration | None) -> tuple[dict, bool | None]:
    """The model's probabilities through a site calibration: (probabilities, uncertain); (same, None) without one.
    softmax(log p / T) equals softmax(z / (T0 T)) for the model's logits z and card temperature T0."""
    if cal is None:
        return probabilities, None
    names = list(probabilities)
    p = calibrated_probs(np.log(np.clip([[probabilities[k] for k in names]], 1e-12, 1.0)), cal.temperature)[0]
    return {k: float(v) for k, v in zip(names, p)}, bool(margin(p) < cal.margin_threshold)


def _reviewed(db: Session, model: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Model probabilities (N, C) and the doctors' readings (N,) of this model's reviewed cases, over the model's own
    classes C (a 3-class model's cases have no tuberculosis column: a TB reading cannot calibrate it)."""
    reviews = latest_reviews(db)
    rows = []
    for case in db.scalars(select(Case).where(Case.status == "done", Case.id.in_(list(reviews)))):
        if model_key(case.model_name, case.model_version) == model:
            # results from before site calibration: what the model said
            rows.append((case.model_probabilities or case.probabilities, reviews[case.id].reading))
    classes = [c for c in CLASSES if c in rows[0][0]] if rows else list(CLASSES)
    kept = [(p, r) for p, r in rows if r in classes]
    probs = [[p.get(c, 0.0) for c in classes] for p, _ in kept]
    labels = [classes.index(r) for _, r in kept]
    return np.array(probs, float).reshape(-1, len(classes)), np.array(labels, int), classes


def readiness(db: Session, model: str) -> dict:
    """Reviewed cases per class against the minimum (shown on the page)."""
    _, y, classes = _reviewed(db, model)
    return _readiness(y, classes)


def _readiness(y: np.ndarray, classes: list[str]) -> dict:
    counts = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    enough = [c for c, n in counts.items() if n >= MIN_PER_CLASS]
    read = [c for c, n in counts.items() if n]
    ready = len(enough) >= 2 and set(read) <= set(enough)
    return {"counts": counts, "minimum": MIN_PER_CLASS, "ready": ready}


def _measure(probs: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    m = np.array([margin(p) for p in probs])
    flagged = m < threshold
    wrong = probs.argmax(1) != y
    return {"log_loss": nll(np.log(np.clip(probs, 1e-12, 1)), y), "ece": expected_calibration_error(probs, y),
            "share_uncertain": float(flagged.mean()),
            "error_not_flagged": float(wrong[~flagged].mean()) if (~flagged).any() else 0.0}


def preview(db: Session, model: str, current_threshold: float) -> dict:
    """Fit on half the reviewed cases, check on the other half; nothing is written."""
    probs, y, classes = _reviewed(db, model)
    ready = _readiness(y, classes)
    if not ready["ready"]:
        raise CalibrationError("too_few", f"too few reviewed cases: {ready['counts']} (at least {MIN_PER_CLASS} of each "
                                          f"class read, and two classes)")
    rng = np.random.default_rng(SEED)
    fit = np.zeros(len(y), bool)
    for k in np.unique(y):  # stratified halves
        idx = rng.permutation(np.flatnonzero(y == k))
        fit[idx[: len(idx) // 2]] = True
    logp = np.log(np.clip(probs, 1e-12, 1))
    t = fit_temperature(logp[fit], y[fit])
    rule = fit_margin_rule(calibrated_probs(logp[fit], t), y[fit], TARGET_ERROR)
    held = ~fit
    before = _measure(probs[held], y[held], current_threshold)
    after = _measure(calibrated_probs(logp[held], t), y[held], rule["threshold"])
    return {"model": model, "temperature": t, "margin_threshold": rule["threshold"], "n_cases": int(len(y)),
            "n_fit": int(fit.sum()), "n_check": int(held.sum()), "counts": ready["counts"],
            "before": before, "after": after, "improves": after["log_loss"] <= before["log_loss"]}


def apply(db: Session, model: str, user: User, current_threshold: float) -> SiteCalibration:
    """A new active version, if the held-out check does not get worse; the previous one is kept for rollback."""
    p = preview(db, model, current_threshold)
    if not p["improves"]:
        raise CalibrationError("no_gain", f"the held-out check gets worse (log loss {p['before']['log_loss']:.3f} -> "
                                          f"{p['after']['log_loss']:.3f}): the current calibration stays")
    current = active(db, model)
    number = (db.scalar(select(func.max(SiteCalibration.version)).where(SiteCalibration.model == model)) or 0) + 1
    if current is not None:
        current.active = False
    cal = SiteCalibration(model=model, version=number, created_by=user.id, temperature=p["temperature"],
                          margin_threshold=p["margin_threshold"], n_cases=p["n_cases"],
                          check={k: p[k] for k in ("before", "after", "n_fit", "n_check", "counts")}, active=True,
                          previous_id=current.id if current else None)
    db.add(cal)
    db.commit()
    return cal


def rollback(db: Session, model: str) -> SiteCalibration | None:
    """Undo the active version: the one it replaced becomes active again (or the model card's own calibration)."""
    current = active(db, model)
    if current is None:
        raise CalibrationError("nothing_to_undo", "no site calibration is active for this model")
    current.active = False
    current.rolled_back_at = utcnow()
    previous = db.get(SiteCalibration, current.previous_id) if current.previous_id else None
    if previous is not None:
        previous.active = True
    db.commit()
    return previous


def calibration_dict(cal: SiteCalibration) -> dict:
    return {"version": cal.version, "model": cal.model, "temperature": round(cal.temperature, 4),
            "margin_threshold": cal.margin_threshold, "n_cases": cal.n_cases, "check": cal.check, "active": cal.active,
            "created_at": cal.created_at.isoformat(), "created_by": cal.creator.email if cal.creator else None,
            "rolled_back_at": cal.rolled_back_at.isoformat() if cal.rolled_back_at else None}
