"""Triage: does this film need a doctor's read soon?

A clinic's first question is not "which disease" but "abnormal or not". The triage score is
1 - p(normal): the probability of any finding the model knows. The model card records the operating
point as ``"triage": {"threshold": t, "target_sensitivity": 0.95, ...}``, chosen on the validation split
so that at least that share of abnormal films score at or above it (``python -m model_training triage``).
Cards without it (models before 2.0.0) keep the old behaviour: a film needs a read when its most probable
class is not normal.
"""

from __future__ import annotations

from dataclasses import dataclass

from model_training.data.labels import NORMAL


@dataclass(frozen=True)
class TriageRule:
    threshold: float | None = None  # None: the most probable class decides
    target_sensitivity: float | None = None

    @classmethod
    def from_card(cls, card: dict) -> "TriageRule":
        t = card.get("triage") or {}
        if t.get("threshold") is None:
            return cls()
        return cls(float(t["threshold"]), t.get("target_sensitivity"))

    @property
    def source(self) -> str:
        """Where the operating point comes from, for the page and the API."""
        if self.threshold is None:
            return "most probable class (the model card has no triage threshold)"
        return (f"1 - p(normal) >= {self.threshold:.3f}, chosen on the validation split for sensitivity "
                f">= {self.target_sensitivity:.0%} for any abnormality" if self.target_sensitivity else
                f"1 - p(normal) >= {self.threshold:.3f}")

    def assess(self, probabilities: dict[str, float]) -> dict | None:
        """{score, needs_read, threshold} for one result's probabilities; None for a model without a normal class."""
        if NORMAL not in probabilities:
            return None
        score = 1.0 - float(probabilities[NORMAL])
        if self.threshold is None:
            needs = max(probabilities, key=probabilities.get) != NORMAL
        else:
            needs = score >= self.threshold
        return {"score": round(score, 6), "needs_read": bool(needs), "threshold": self.threshold}
