"""The ship rule: a new default model ships only if it holds better in hospitals it has never seen.

Its worst held-out-source COVID-19 ROC-AUC (leave one source out, :mod:`.external`) must beat the
current model's recipe, and its in-source accuracies (the run's test split, the Kermany official test)
may be at most ``tolerance`` worse. Missing numbers fail the rule: nothing ships on an unmeasured claim.
"""

from __future__ import annotations

import json
from pathlib import Path

TOLERANCE = 0.01  # one accuracy point
IN_SOURCE = ("run_test_accuracy", "kermany_test_accuracy")


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


def decide(candidate: dict, baseline: dict, tolerance: float = TOLERANCE) -> dict:
    checks, ok = [], True
    ca, ba = candidate.get("worst_covid19", {}).get("auc"), baseline.get("worst_covid19", {}).get("auc")
    if ca is None or ba is None:
        checks.append("worst held-out COVID-19 AUC missing: fails")
        ok = False
    else:
        passed = ca > ba
        ok &= passed
        checks.append(f"worst held-out COVID-19 AUC {ca:.3f} vs {ba:.3f}: {'beats' if passed else 'does not beat'} it")
    for key in IN_SOURCE:
        c, b = candidate.get("in_source", {}).get(key), baseline.get("in_source", {}).get(key)
        if c is None or b is None:
            checks.append(f"{key} missing: fails")
            ok = False
            continue
        passed = c >= b - tolerance
        ok &= passed
        checks.append(f"{key} {c:.3f} vs {b:.3f}: {'within' if passed else 'more than'} {tolerance * 100:.0f} point(s)"
                      f"{'' if passed else ' worse'}")
    return {"ships": bool(ok), "candidate": candidate.get("name"), "baseline": baseline.get("name"), "checks": checks}
