"""An ensemble served as a cascade: its first network answers alone when it is sure, the others only when not.

Most films are easy: on 1.5.0's validation split its first network answers 88 % of them alone (at least 85 % sure,
and among the X-rays it knows), and on every one of those the ensemble says the same. Running the second network
only for the rest costs about 1.1 networks per film instead of 2. The card says when (``"cascade"``, written by
``python -m model_training release-cascade``, which keeps it only if the cascade passes the parity rule against the
full ensemble):

    "cascade": {"members": ["cxr-screen.m0.onnx", "cxr-screen.m1.onnx"], "exit_probability": 0.85,
                "first_temperature": 1.087, "ensemble_temperature": 1.076, "doubt": {"distance": 0.917, ...},
                "ood": {"file": "cxr-screen.cascade.ood.npz", ...}, "shipped": true}

A film the first network answers alone gets its calibrated probabilities (its own temperature), its class map and
the verdict of a refusal gate fitted on its embedding (as any model's gate is). The others get the ensemble's mean
logits, mean class map and the ensemble's own gate, as the merged file computes them. A film is left to the first
network only when it is also sure the film looks like the X-rays it knows: one whose embedding lies further from
them than 95 % of validation X-rays goes to every network (a grey photograph that the first network's gate alone
would let pass is refused by the ensemble's), and so do most films of a hospital it never saw.
``CXR_CASCADE=0`` serves the full ensemble from the merged file.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ood
from .onnx_backend import OnnxBackend

ENV_SWITCH = "CXR_CASCADE"


def enabled() -> bool:
    """False when the operator asked for the full ensemble (CXR_CASCADE=0/false/off/no)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class CascadeRule:
    exit_probability: float  # the first network answers alone at or above this calibrated top probability
    first_temperature: float  # the first network's own calibration
    ensemble_temperature: float  # the ensemble's temperature when the cascade was made (its card's)
    doubt: float = np.inf  # ... and only below this scaled embedding distance to the X-rays its gate knows

    def exits(self, first_logits: np.ndarray, distance: np.ndarray | None = None) -> np.ndarray:
        sure = softmax(first_logits / self.first_temperature).max(axis=1) >= self.exit_probability
        return sure if distance is None else sure & (distance <= self.doubt)

    def as_ensemble_logits(self, first_logits: np.ndarray) -> np.ndarray:
        """The first network's logits scaled so that the ensemble's temperature gives its own calibrated answer (a
        card whose temperature was changed since scales both paths' answers alike)."""
        return first_logits * (self.ensemble_temperature / self.first_temperature)


class CascadeGate:
    """The refusal gate of a cascade, ``score(embedding, thumbnails)`` like ``ood.XrayGate``. The backend leaves
    the part of the embedding that the other networks did not compute as NaN: those films are scored by the first
    network's gate, rescaled so that the ensemble gate's threshold refuses exactly what the first gate's would; the
    others by the ensemble's gate."""

    def __init__(self, first: ood.XrayGate, whole: ood.XrayGate):
        self.first, self.whole = first, whole
        self.threshold = whole.threshold
        self.width = first.emb_ref.shape[1]

    def distance(self, first_emb: np.ndarray) -> np.ndarray:
        """How far the first network's embeddings lie from the X-rays its gate knows (1 = its 99th percentile)."""
        return self.first._knn(self.first.emb_ref, ood._unit(first_emb)) / self.first.emb_scale

    def score(self, emb: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
        emb = np.asarray(emb, np.float32)
        alone = np.isnan(emb[:, self.width:]).any(axis=1)
        out = np.empty(len(emb))
        if alone.any():
            out[alone] = (self.first.score(emb[alone, :self.width], thumbs[alone])
                          * (self.whole.threshold / self.first.threshold))
        if (~alone).any():
            out[~alone] = self.whole.score(emb[~alone], thumbs[~alone])
        return out


class CascadeBackend:
    """``backend(x) -> (logits, cam, embedding)`` like OnnxBackend, from one file per member. The embedding is the
    ensemble's (every member's, side by side); where only the first network ran, the others' part is NaN."""

    def __init__(self, members: list[Path], rule: CascadeRule, gate: CascadeGate, threads: int | None = None):
        self.rule, self.gate = rule, gate
        self.first = OnnxBackend(members[0], threads)
        self.others = [OnnxBackend(p, threads) for p in members[1:]]
        self.films = 0
        self.first_only = 0
        self._count = threading.Lock()

    def __call__(self, x: np.ndarray):
        logits, cam, emb = self.first(x)
        alone = self.rule.exits(logits, self.gate.distance(emb))
        out_logits = self.rule.as_ensemble_logits(logits)
        out_cam = None if cam is None else cam.copy()
        out_emb = np.full((len(x), emb.shape[1] * (1 + len(self.others))), np.nan, np.float32)
        out_emb[:, :emb.shape[1]] = emb
        rest = np.flatnonzero(~alone)
        if len(rest):
            xs = x[rest]
            total_logits, total_cam = logits[rest].copy(), None if cam is None else cam[rest].copy()
            embs = [emb[rest]]
            for other in self.others:
                lg, cm, em = other(xs)
                total_logits += lg
                embs.append(em)
                if total_cam is not None:
                    total_cam += cm
            n = 1 + len(self.others)
            out_logits[rest] = total_logits / n
            if out_cam is not None:
                out_cam[rest] = total_cam / n
            out_emb[rest] = np.concatenate(embs, axis=1)
        with self._count:
            self.films += len(x)
            self.first_only += int(alone.sum())
        return out_logits, out_cam, out_emb

    def status(self) -> dict:
        return {"exit_probability": self.rule.exit_probability, "films": self.films,
                "answered_by_first_network_alone": self.first_only,
                "share_alone": round(self.first_only / self.films, 4) if self.films else None}


def members_missing(card: dict, card_dir: Path) -> list[str]:
    c = card.get("cascade") or {}
    files = list(c.get("members") or []) + [(c.get("ood") or {}).get("file") or ""]
    return [f for f in files if not f or not (card_dir / f).is_file()]


def load(card: dict, card_dir: Path, whole: ood.XrayGate | None,
         threads: int | None = None) -> tuple[CascadeBackend, CascadeGate] | None:
    """The cascade a card ships, or None (none shipped, switched off, or its files missing: the full ensemble
    then serves, with a warning for the last)."""
    c = card.get("cascade") or {}
    if not c.get("shipped") or not enabled() or whole is None:
        return None
    missing = members_missing(card, card_dir)
    if missing:
        import warnings

        warnings.warn(f"the model card ships a cascade but {', '.join(missing)} is missing beside it: serving the "
                      "full ensemble (python -m model_training release-cascade writes them)", stacklevel=2)
        return None
    rule = CascadeRule(float(c["exit_probability"]), float(c["first_temperature"]),
                       float(c.get("ensemble_temperature") or (card.get("calibration") or {}).get("temperature", 1.0)),
                       float((c.get("doubt") or {}).get("distance", np.inf)))
    gate = CascadeGate(ood.XrayGate.load(card_dir / c["ood"]["file"]), whole)
    return CascadeBackend([card_dir / m for m in c["members"]], rule, gate, threads), gate
