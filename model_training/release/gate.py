"""The refusal gate of a model ("is this a chest X-ray?"): reference films drawn over every source, fitted on the
exported model's own embeddings (uplink_server.ood)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from uplink_server.ood import fit_gate_from_onnx
from uplink_server.preprocessing import PreprocessSpec

from ..data.datasets import Record, load_spec
from ..data.splits import split_records
from .model_card import KNN_GATE_METHOD


def refit_gate(run: Path, seed: int = 0):
    """Fit a finished run's OOD gate again from its exported model and split; updates its card."""
    card = json.loads((run / "model_card.json").read_text())
    by_split = split_records(load_spec(str(run / "splits.csv")))
    gate = fit_ood_gate(run / "model.onnx", PreprocessSpec.from_dict(card["preprocessing"]), by_split, seed)
    gate.save(run / "ood.npz")
    card["ood"].update({"file": "ood.npz", "threshold": gate.threshold, "method": KNN_GATE_METHOD})
    (run / "model_card.json").write_text(json.dumps(card, indent=2))
    return gate


def stratified(records: list[Record], n: int, seed: int = 0) -> list[Record]:
    """Up to ``n`` records drawn round-robin over sources (shuffled within each): a small source is not
    crowded out of the gate's reference set by a large one."""
    rng = random.Random(seed)
    by_source: dict[str, list[Record]] = {}
    for r in records:
        by_source.setdefault(r.source, []).append(r)
    for rs in by_source.values():
        rng.shuffle(rs)
    out, i = [], 0
    while len(out) < n and any(i < len(rs) for rs in by_source.values()):
        out += [rs[i] for _, rs in sorted(by_source.items()) if i < len(rs)]
        i += 1
    return out[:n]


def fit_ood_gate(model_path: Path, spec, by_split: dict, seed: int = 0, n_fit: int = 2000, n_held: int = 1000):
    """The refusal gate: reference X-rays from training and a threshold from validation, both drawn over every
    source, the threshold high enough for each source's own validation X-rays (uplink_server.ood.fit_gate)."""
    fit = stratified(by_split["train"], n_fit, seed)
    held = stratified(by_split["val"], n_held, seed)
    return fit_gate_from_onnx(model_path, spec, [r.path for r in fit], [r.path for r in held],
                              held_groups=[r.source for r in held])
