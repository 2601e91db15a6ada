"""Doctor review of cases and how the model does at this site against those readings.

A review is the doctor's reading (normal, pneumonia, COVID-19, other finding, not assessable), whether they
agree with the AI, a note, who and when. Reviews are never edited: a new reading is a new row and the newest
one counts, so the history of a case stays readable.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from statistics import NormalDist

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from model_training.data.labels import CLASSES, NORMAL
from uplink_server import drift

from .db import Case, Review, SiteSetting, User
from .security import can

READINGS = (*CLASSES, "other", "not_assessable")
NOTE_MAX = 1000
TECHNICIANS_REVIEW = "technicians_review"  # site setting: "1" lets technicians review and see site performance


def model_key(name: str | None, version: str | None) -> str:
    """How a model version is named in results, site calibrations and drift references: "name version"."""
    return f"{name or ''} {version or ''}".strip()


class ReviewError(ValueError):
    """A review that cannot be recorded; ``code`` is translated (i18n ``rv_<code>``)."""

    def __init__(self, code: str, message: str, status: int = 422):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def site_flag(db: Session, key: str) -> bool:
    row = db.get(SiteSetting, key)
    return bool(row and row.value == "1")


def set_site_flag(db: Session, key: str, on: bool) -> None:
    row = db.get(SiteSetting, key) or SiteSetting(key=key)
    row.value = "1" if on else "0"
    db.add(row)
    db.commit()


def may_review(db: Session, user: User) -> bool:
    """Doctors and admins; technicians only where an admin allows it."""
    return can(user.role, "review") or (user.role == "technician" and site_flag(db, TECHNICIANS_REVIEW))


def may_see_performance(db: Session, user: User) -> bool:
    return can(user.role, "performance") or (user.role == "technician" and site_flag(db, TECHNICIANS_REVIEW))


def add_review(db: Session, case: Case, user: User, reading: str, agrees: bool | None = None, note: str = "") -> Review:
    """Record a reading; raises ReviewError (and writes nothing) for what cannot be a review."""
    if not may_review(db, user):
        raise ReviewError("forbidden", "your role may not review cases (an admin can allow technicians)", 403)
    reading = (reading or "").strip().lower()
    if reading not in READINGS:
        raise ReviewError("unknown_reading", f"unknown reading {reading!r}: use one of {', '.join(READINGS)}")
    if case.status != "done":
        raise ReviewError("no_result", "this study has no AI result to review (refused or still pending): "
                                       "arrange a retake or analyze it again first")
    note = (note or "").strip()
    if len(note) > NOTE_MAX:
        raise ReviewError("note_too_long", f"the note is longer than {NOTE_MAX} characters")
    same = reading == case.label
    if agrees is None:  # not said: the reading says it
        agrees = same
    elif bool(agrees) != same:  # agreement is data the performance page and recalibration rely on
        raise ReviewError("contradiction", f"the reading {reading!r} {'is' if same else 'is not'} the AI's result "
                                           f"({case.label!r}), so it cannot be stored as {'dis' if agrees is False else ''}agreement: "
                                           "leave agreement out and it follows from the reading")
    review = Review(case_id=case.id, reviewer_id=user.id, reading=reading, agrees=bool(agrees), note=note)
    db.add(review)
    db.commit()
    return review


def latest_reviews(db: Session, case_ids: list[int] | None = None) -> dict[int, Review]:
    """The newest review of each case (of ``case_ids``, or of every case)."""
    newest = select(func.max(Review.id)).group_by(Review.case_id)
    if case_ids is not None:
        if not case_ids:
            return {}
        newest = newest.where(Review.case_id.in_(case_ids))
    return {r.case_id: r for r in db.scalars(select(Review).where(Review.id.in_(newest)))}


def next_unreviewed(db: Session, after: int | None = None) -> Case | None:
    """The worklist's next case for a reader: analysed, not yet read, highest risk first (then newest)."""
    read = select(Review.case_id)
    query = select(Case).where(Case.status == "done", Case.id.not_in(read))
    if after is not None:
        query = query.where(Case.id != after)
    return db.scalar(query.order_by(Case.risk.is_(None), Case.risk.desc(), Case.created_at.desc()).limit(1))


def history(db: Session, case_id: int) -> list[Review]:
    """Every reading of a case, newest first."""
    return list(db.scalars(select(Review).where(Review.case_id == case_id).order_by(Review.id.desc())))


def review_dict(r: Review | None) -> dict | None:
    if r is None:
        return None
    return {"id": r.id, "reading": r.reading, "agrees": r.agrees, "note": r.note,
            "reviewer": r.reviewer.email if r.reviewer else None, "created_at": r.created_at.isoformat()}


# ---- site performance --------------------------------------------------------------------------------------

Z95 = NormalDist().inv_cdf(0.975)
# A site's sensitivity or specificity is compared with the card (and can raise a warning) only from this many
# cases in its denominator: at n = 3 the 95 % interval spans most of [0, 1] and an alarm means nothing.
MIN_FOR_WARNING = 20
# What a reading says about triage: anything but a normal film needs a doctor's read ("other finding" too);
# "not assessable" says nothing either way.
ABNORMAL_READINGS = tuple(r for r in READINGS if r not in (NORMAL, "not_assessable"))


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """95 % Wilson score interval of k successes in n (sound for small n and for 0 or n successes)."""
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def reliability(confidence: list[float], correct: list[bool], bins: int = 10) -> dict:
    """Reliability diagram data: per confidence bin, how often the AI's class was the doctor's; and the ECE."""
    conf, ok = np.asarray(confidence, float), np.asarray(correct, float)
    edges = np.linspace(0, 1, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            rows.append({"lo": round(float(lo), 2), "hi": round(float(hi), 2), "n": int(m.sum()),
                         "confidence": float(conf[m].mean()), "accuracy": float(ok[m].mean())})
            ece += m.mean() * abs(ok[m].mean() - conf[m].mean())
    return {"bins": rows, "ece": float(ece) if len(conf) else None}


def performance(db: Session, references: dict | None = None) -> dict:
    """Per model version: the AI's result against the doctors' newest readings (cases read as normal, pneumonia
    or COVID-19), the share of uncertain and refused results, and how many readings were 'other' or 'not
    assessable'. Sensitivity and specificity per class come with 95 % Wilson intervals; the reliability of the
    shown probabilities; and drift of the scores and images against ``references`` ({model: card reference})."""
    cases = db.scalars(select(Case).where(Case.status.in_(("done", "refused")))).all()
    reviews = latest_reviews(db)
    by_version: dict[str, list[Case]] = defaultdict(list)
    before_model = 0  # refused before any model saw them (not an image, corrupt...): no model's doing
    for c in cases:
        if c.model_name:
            by_version[model_key(c.model_name, c.model_version)].append(c)
        else:
            before_model += 1
    out = {}
    for version, cs in sorted(by_version.items()):
        done = [c for c in cs if c.status == "done"]
        read = [(c, reviews[c.id]) for c in done if c.id in reviews]
        # rows: the doctor's reading, an "other finding" included (a film the AI called normal that a doctor
        # found abnormal is a miss, whatever the finding); columns: the AI's result
        rows = (*CLASSES, "other")
        pairs = [(c.label, r.reading) for c, r in read if r.reading in rows and c.label in CLASSES]
        cm = np.zeros((len(rows), len(CLASSES)), int)
        for ai, doc in pairs:
            cm[rows.index(doc), CLASSES.index(ai)] += 1
        per_class = {}
        for i, cls in enumerate(CLASSES):
            tp = int(cm[i, i])
            fn = int(cm[i].sum() - tp)
            fp = int(cm[:, i].sum() - tp)
            tn = int(cm.sum() - tp - fn - fp)
            per_class[cls] = {"n": tp + fn, **proportion("sensitivity", tp, tp + fn), **proportion("specificity", tn, tn + fp)}
        triage = [(c.triage_flag, r.reading in ABNORMAL_READINGS) for c, r in read
                  if r.reading != "not_assessable" and c.triage_flag is not None]
        tp = sum(1 for flag, sick in triage if flag and sick)
        tn = sum(1 for flag, sick in triage if not flag and not sick)
        n_sick = sum(1 for _, sick in triage if sick)
        site_triage = {"n": len(triage), "abnormal": n_sick, "missed": n_sick - tp,
                       **proportion("sensitivity", tp, n_sick), **proportion("specificity", tn, len(triage) - n_sick)}
        other = Counter(r.reading for _, r in read if r.reading not in CLASSES)
        compared = [(c, r) for c, r in read if r.reading in CLASSES and c.label in CLASSES]
        model_probs = [c.model_probabilities or c.probabilities for c in done if c.probabilities]
        drift_values = {"risk": [1.0 - p.get("normal", 0.0) for p in model_probs],
                        "image_mean": [c.image_stats["image_mean"] for c in cs if c.image_stats],
                        "image_std": [c.image_stats["image_std"] for c in cs if c.image_stats]}
        out[version] = {
            "cases": len(cs), "analysed": len(done), "reviewed": len(read), "compared": len(pairs),
            "agreement": float(np.trace(cm[:len(CLASSES)]) / cm.sum()) if cm.sum() else None,
            "confusion_matrix": cm.tolist(), "classes": list(CLASSES), "readings": list(rows), "per_class": per_class,
            "triage": site_triage, "min_for_warning": MIN_FOR_WARNING,
            "share_uncertain": sum(c.uncertain for c in done) / len(done) if done else None,
            "share_refused": (len(cs) - len(done)) / len(cs) if cs else None,
            "other_readings": dict(other),
            "disagreements": sum(1 for _, r in read if not r.agrees),
            "reliability": reliability([max(c.probabilities.values()) for c, _ in compared],
                                       [c.label == r.reading for c, r in compared]),
            "drift": drift.compare((references or {}).get(version), drift_values),
        }
    return {"readings": list(READINGS), "by_model": out, "refused_before_analysis": before_model}


def proportion(name: str, k: int, n: int) -> dict:
    """A site statistic as counts first (k of n), its value and 95 % interval, and whether n is enough to
    compare it with the card (``MIN_FOR_WARNING``)."""
    return {name: k / n if n else None, f"{name}_k": k, f"{name}_n": n, f"{name}_ci95": wilson(k, n),
            f"{name}_enough": n >= MIN_FOR_WARNING}


def card_references(local) -> dict:
    """{model: drift reference} from the web app's own model's card (remote models' cards are not known here)."""
    if local is None or not (local.card or {}).get("reference"):
        return {}
    return {model_key(local.name, local.version): local.card["reference"]}


def compare_with_card(perf: dict, card: dict | None) -> dict:
    """The site's sensitivity and specificity per class against the model card's test split, for the model
    version the card describes. A warning when even the upper end of the site's 95 % interval is below the
    card's value (the model does worse here than where it was validated)."""
    if not card:
        return {"version": None, "warnings": [], "card": {}}
    version = model_key(card.get("name"), card.get("version"))
    ref = ((card.get("metrics") or {}).get("test") or {}).get("per_class") or {}
    site = perf["by_model"].get(version)
    warnings = []
    for cls, values in ref.items():
        got = (site or {}).get("per_class", {}).get(cls)
        for measure in ("sensitivity", "specificity"):
            ci = got and got.get(f"{measure}_ci95")
            if ci and got.get(f"{measure}_enough") and values.get(measure) is not None and ci[1] < values[measure]:
                warnings.append({"class": cls, "measure": measure, "site": got[measure], "ci95": ci, "card": values[measure]})
    return {"version": version, "warnings": warnings,
            "card": {c: {m: v.get(m) for m in ("sensitivity", "specificity")} for c, v in ref.items()}}
