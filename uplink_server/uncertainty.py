"""When a result is flagged "uncertain": the rule its model card records.

A near tie (53 % pneumonia, 44 % COVID-19) must not read as a confident call.
The rule is chosen on validation data (``python -m model_training uncertainty``)
and stored in the card as ``"uncertainty": {"rule": "margin", "threshold": m, ...}``:
a result is uncertain when its top probability leads the runner-up by less than
``m``. Cards without it keep the old rule, top probability under
``uncertain_threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def margin(probs: np.ndarray) -> float:
    """Top probability minus the runner-up's (1 for a single class)."""
    p = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
    return float(p[0] - (p[1] if len(p) > 1 else 0.0))


@dataclass(frozen=True)
class UncertaintyRule:
    rule: str = "top_probability"  # or "margin"
    threshold: float = 0.0

    @classmethod
    def from_card(cls, card: dict) -> "UncertaintyRule":
        u = card.get("uncertainty")
        if u:
            if u.get("rule") not in ("margin", "top_probability"):
                raise ValueError(f"unknown uncertainty rule {u.get('rule')!r} in the model card")
            return cls(u["rule"], float(u["threshold"]))
        return cls("top_probability", float(card.get("uncertain_threshold", 0.0)))

    def is_uncertain(self, probs: np.ndarray) -> bool:
        if self.rule == "margin":
            return margin(probs) < self.threshold
        return float(np.max(probs)) < self.threshold
