"""The one place that knows the class list and how raw labels map to it."""

from __future__ import annotations

# Canonical order. New lung conditions are appended here (never reordered), so
# that class indices of older models stay meaningful.
CLASSES: tuple[str, ...] = ("normal", "pneumonia", "covid19", "tuberculosis")

DISPLAY_NAMES = {
    "normal": {"en": "Normal", "es": "Normal"},
    "pneumonia": {"en": "Pneumonia", "es": "Neumonía"},
    "covid19": {"en": "COVID-19", "es": "COVID-19"},
    "tuberculosis": {"en": "Tuberculosis", "es": "Tuberculosis"},
}

# The class whose probability is subtracted from 1 for the triage score ("does this film need a doctor?").
NORMAL = "normal"

_ALIASES = {
    "normal": "normal",
    "no finding": "normal",
    "healthy": "normal",
    "pneumonia": "pneumonia",
    "bacteria": "pneumonia",
    "bacterial": "pneumonia",
    "virus": "pneumonia",
    "viral": "pneumonia",
    "viral pneumonia": "pneumonia",
    "bacterial pneumonia": "pneumonia",
    "lung_opacity": "pneumonia",
    "covid": "covid19",
    "covid19": "covid19",
    "covid-19": "covid19",
    "covid_19": "covid19",
    "tuberculosis": "tuberculosis",
    "tb": "tuberculosis",
}

# Labels present in the data that are deliberately not learned (too few, too vague).
IGNORED_LABELS = {"other", "unknown", ""}


class LabelError(ValueError):
    pass


def canonical_label(raw: str) -> str | None:
    """Map a raw label or folder name to a class; None for ignored labels."""
    key = str(raw).strip().lower()
    if key in IGNORED_LABELS:
        return None
    if key in _ALIASES:
        return _ALIASES[key]
    raise LabelError(f"unknown label {raw!r}; known: {sorted(set(_ALIASES))} (ignored: {sorted(IGNORED_LABELS - {''})})")


def classes_present(labels) -> tuple[str, ...]:
    """The canonical classes that occur in ``labels``, in canonical order."""
    seen = set(labels)
    return tuple(c for c in CLASSES if c in seen)
