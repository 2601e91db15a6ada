"""Per-image sampling weights for the training loader.

``class``: every class drawn equally often.

``group``: every (age group, class) cell drawn equally often. In the public data
age group and source confound the labels: nearly all pneumonia is Kermany's
children, most normals are adults, all COVID-19 is adult. Balancing classes alone
still shows the model a child with pneumonia about four times as often as a
healthy child, so "child" itself predicts pneumonia. Balancing within each age
group removes that prior. Cells smaller than ``min_cell`` images get
proportionally less mass so a few dozen images are not repeated hundreds of
times per epoch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def sample_weights(labels: Sequence[str], groups: Sequence[str] | None = None, mode: str = "class",
                   min_cell: int = 500) -> np.ndarray:
    """Weights (summing to 1) for ``WeightedRandomSampler``, one per image."""
    if mode == "class" or groups is None:
        cells = list(labels)
    elif mode == "group":
        cells = [(g or "unknown", lab) for g, lab in zip(groups, labels)]
    else:
        raise ValueError(f"unknown balance mode {mode!r} (class or group)")
    counts = Counter(cells)
    mass = {c: (1.0 if mode == "class" else min(1.0, n / min_cell)) for c, n in counts.items()}
    w = np.array([mass[c] / counts[c] for c in cells], dtype=float)
    return w / w.sum()
