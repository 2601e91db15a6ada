"""The model card's reference for drift checks at a site: histograms of the risk score and of the images' gray
levels on the validation split (``uplink_server.drift``)."""

from __future__ import annotations

import json
from pathlib import Path

from uplink_server import drift
from uplink_server.imaging import decode

from ..data.labels import NORMAL
from ..evaluation.triage import triage_scores


def build(model_path: Path, data: str | None = None, progress: bool = True) -> dict:
    from ..evaluation.evaluate import predict_validation

    clf, logits, kept = predict_validation(model_path, data, progress)
    probs = clf.probabilities(logits)
    risk = triage_scores(probs, clf.classes) if NORMAL in clf.classes else probs.max(1)
    stats = [drift.image_statistics(decode(r.path).gray) for r in kept]
    ref = drift.reference({"risk": risk.tolist(), "image_mean": [s["image_mean"] for s in stats],
                           "image_std": [s["image_std"] for s in stats]})
    ref["data"] = "validation split"
    return ref


def write(model_path: Path, ref: dict) -> Path:
    from uplink_server.model import find_card

    card_path = find_card(Path(model_path))
    card = json.loads(card_path.read_text())
    card["reference"] = ref
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card_path
