"""Framing stress test: the same X-rays as if collimated tighter.

Kermany's official test normals are framed tighter than its training normals
(lungs filling the image, no shoulders or abdomen). Model 1.3.0 called 27 % of
them pneumonia, and cropping its own validation normals 1.4x tighter made it
call half of those pneumonia too: it had learnt framing, not lungs. This check
measures that on any model, and the ``framing`` augmentation trains against it.
"""

from __future__ import annotations

import numpy as np

FACTORS = (1.2, 1.4)


def tighter(gray: np.ndarray, factor: float) -> np.ndarray:
    """The centre 1/factor of each side (factor >= 1); preprocessing resizes it back as usual."""
    if factor < 1:
        raise ValueError(f"framing factor {factor} < 1: only tighter framing is simulated")
    h, w = gray.shape
    ch, cw = max(1, round(h / factor)), max(1, round(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    return gray[top:top + ch, left:left + cw]


def normals_called_abnormal(res: dict, source: str = "kermany") -> dict | None:
    """Of ``source``'s normals in an evaluation, how many were called something else."""
    m = res.get("by_source", {}).get(source)
    if not m or "normal" not in m["classes"]:
        return None
    row = np.asarray(m["confusion_matrix"])[m["classes"].index("normal")]
    n = int(row.sum())
    if not n:
        return None
    wrong = n - int(row[m["classes"].index("normal")])
    return {"n": n, "count": wrong, "rate": wrong / n}


def framing_checks(evaluations: dict[str, dict[float, dict]]) -> tuple[dict, list[str]]:
    """``evaluations[name][factor]``: evaluate()'s result on data ``name`` cropped ``factor`` x tighter
    (1.0 = as is). Returns counts per name and factor, and one readable line per name."""
    counts, lines = {}, []
    for name, by_factor in evaluations.items():
        rates = {f: normals_called_abnormal(r) for f, r in sorted(by_factor.items())}
        rates = {f: r for f, r in rates.items() if r}
        if not rates:
            continue
        counts[name] = {str(f): r for f, r in rates.items()}
        steps = ", ".join(f"{r['count']}/{r['n']} = {r['rate']:.1%} " + ("as taken" if f == 1 else f"cropped {f:g}x tighter")
                          for f, r in rates.items())
        lines.append(f"Framing stress test, children's normals called abnormal ({name}): {steps}")
    return counts, lines
