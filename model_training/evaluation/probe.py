"""The shortcut probe: can a linear model tell an image's source (hospital) from the model's embedding,
with the label held fixed?

Within one class and one age group every source shows the same disease, so whatever a probe reads there
is the hospital: machine, exposure, markers, framing. Balanced accuracy near chance (1 / number of
sources) means the embedding does not carry the hospital; near 1 means the shortcut is there to be used.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def source_probe(emb: np.ndarray, labels: list[str], sources: list[str], age_groups: list[str] | None = None,
                 min_per_source: int = 15, max_per_source: int = 300, folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated balanced accuracy of source prediction in each (class, age group) stratum that holds
    at least two sources with ``min_per_source`` images; each source capped at ``max_per_source``."""
    rng = np.random.default_rng(seed)
    strata = defaultdict(lambda: defaultdict(list))
    for i, (lab, src) in enumerate(zip(labels, sources)):
        strata[(lab, (age_groups or [""] * len(labels))[i])][src].append(i)
    out, total_n, weighted, weighted_chance = {}, 0, 0.0, 0.0
    for (lab, age), by_src in sorted(strata.items()):
        keep = {s: ii for s, ii in by_src.items() if len(ii) >= min_per_source}
        if len(keep) < 2:
            continue
        idx, ys = [], []
        for s, ii in sorted(keep.items()):
            take = rng.permutation(ii)[:max_per_source]
            idx.extend(take)
            ys.extend([s] * len(take))
        ys = np.array(ys)
        k = min(folds, min(np.unique(ys, return_counts=True)[1]))
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced"))
        pred = cross_val_predict(clf, emb[idx], ys, cv=StratifiedKFold(k, shuffle=True, random_state=seed))
        bacc = float(balanced_accuracy_score(ys, pred))
        chance = 1.0 / len(keep)
        name = f"{lab}/{age}" if age else lab
        out[name] = {"sources": {s: int(min(len(ii), max_per_source)) for s, ii in sorted(keep.items())},
                     "balanced_accuracy": bacc, "chance": chance}
        total_n += len(idx)
        weighted += bacc * len(idx)
        weighted_chance += chance * len(idx)
    summary = {"strata": out}
    if total_n:
        summary["balanced_accuracy"] = weighted / total_n
        summary["chance"] = weighted_chance / total_n
    return summary


def describe(probe: dict) -> str:
    if "balanced_accuracy" not in probe:
        return "source probe: no class holds two sources with enough images"
    parts = [f"{k} {v['balanced_accuracy']:.2f} (chance {v['chance']:.2f}, {len(v['sources'])} sources)"
             for k, v in probe["strata"].items()]
    return f"source probe {probe['balanced_accuracy']:.2f} (chance {probe['chance']:.2f}): " + "; ".join(parts)
