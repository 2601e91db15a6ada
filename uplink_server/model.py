"""Loading a model + its card, and classifying one upload end to end."""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import cascade as cascade_serving
from . import gradcam, ood
from .errors import ModelNotFound, Refusal
from .imaging import DecodedImage, decode
from .onnx_backend import OnnxBackend
from .preprocessing import PreprocessSpec, preprocess, view_box
from .stages import stage
from .triage import TriageRule
from .uncertainty import UncertaintyRule, margin

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = REPO_ROOT / "weights"
DEFAULT_MODEL_NAME = "cxr-screen.onnx"


def default_model_path() -> Path:
    """$CXR_MODEL, else the shipped default in weights/."""
    env = os.environ.get("CXR_MODEL")
    return Path(env) if env else WEIGHTS_DIR / DEFAULT_MODEL_NAME


def find_card(model_path: Path) -> Path | None:
    stem = model_path.name.rsplit(".", 1)[0]
    for cand in (model_path.with_name(stem + ".card.json"), model_path.parent / "model_card.json"):
        if cand.is_file():
            return cand
    return None


@dataclass
class Prediction:
    file: str = ""
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    uncertain: bool = False
    margin: float | None = None  # top probability minus the runner-up's
    triage: dict | None = None  # {score: 1 - p(normal), needs_read, threshold} (uplink_server.triage)
    refused: bool = False
    refusal: dict | None = None
    model: str = ""
    version: str = ""
    elapsed_ms: float = 0.0
    ood_score: float | None = None
    heatmap: np.ndarray | None = None  # (H, W) in [0, 1] at the model's input size
    heatmap_png: bytes | None = None
    heatmap_box: tuple | None = None  # where in the image the model looked (top, bottom, left, right)
    heatmap_shape: tuple | None = None  # the image's (height, width) the box refers to

    @property
    def outcome(self) -> str:
        return "refused" if self.refused else ("uncertain" if self.uncertain else self.label or "")

    def heatmap_fields(self) -> dict:
        """The heatmap as a reply to a web app carries it: the drawn picture (base64 PNG), or the class map alone
        when only that was made (a web app that asked for ``heatmap: "map"`` draws it when someone looks)."""
        if self.heatmap_png:
            return {"heatmap_png": base64.b64encode(self.heatmap_png).decode("ascii")}
        if self.heatmap is not None and self.heatmap_shape is not None:
            return {"heatmap_png": None, "heatmap_map": gradcam.map_to_dict(self.heatmap, self.heatmap_box, self.heatmap_shape)}
        return {"heatmap_png": None}

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "label": self.label,
            "outcome": self.outcome,
            "probabilities": self.probabilities,
            "uncertain": self.uncertain,
            "margin": None if self.margin is None else round(self.margin, 4),
            "triage": self.triage,
            "refused": self.refused,
            "refusal": self.refusal,
            "model": self.model,
            "version": self.version,
            "elapsed_ms": round(self.elapsed_ms, 1),
            "ood_score": None if self.ood_score is None else round(self.ood_score, 4),
        }


@dataclass
class Prepared:
    """One upload between ``Classifier.prepare`` and ``Classifier.finish``."""

    pred: Prediction
    image: DecodedImage | None
    x: np.ndarray | None  # the preprocessed input; None when refused
    thumb: np.ndarray | None = None  # for the refusal gate; None when it does not apply


class Classifier:
    """An exported model with its card: preprocessing, classes, calibration, OOD gate.

    ``predict`` never raises on bad input: it returns a refused Prediction.
    """

    def __init__(self, model_path: str | Path | None = None, card: dict | None = None, threads: int | None = None,
                 cascade: bool = True):
        """``cascade=False`` serves an ensemble whole even where its card ships a cascade (``uplink_server.cascade``)."""
        path = Path(model_path) if model_path else default_model_path()
        if not path.is_file():
            raise ModelNotFound(
                f"model file {path} not found. Train one (python -m model_training train ...) or pass --model PATH."
            )
        self.path = path
        self.threads = threads
        if card is None:
            card_path = find_card(path)
            if card_path is None:
                raise ModelNotFound(f"no model card next to {path} (expected {path.with_suffix('')}.card.json or model_card.json)")
            card = json.loads(card_path.read_text())
            self.card_dir = card_path.parent
        else:
            self.card_dir = path.parent
        self.card = card
        self.classes: list[str] = list(card["classes"])
        self.spec = PreprocessSpec.from_dict(card["preprocessing"])
        if self.spec.roi != "frame":  # a missing segmenter stops the start, not every request
            from .lungfield import SegmenterMissing, check_segmenter

            try:
                check_segmenter()
            except SegmenterMissing as exc:
                raise ModelNotFound(f"{path} reads the lung field: {exc}") from None
        self.temperature = float(card.get("calibration", {}).get("temperature", 1.0))
        self.uncertainty = UncertaintyRule.from_card(card)
        self.triage = TriageRule.from_card(card)
        self.name = card.get("name", path.stem)
        self.version = str(card.get("version", ""))
        self.gate = None
        ood_file = card.get("ood", {}).get("file")
        if ood_file and (self.card_dir / ood_file).is_file():
            self.gate = ood.XrayGate.load(self.card_dir / ood_file)
        self.cascade = None
        loaded = cascade_serving.load(card, self.card_dir, self.gate, threads) if cascade and path.suffix == ".onnx" else None
        if loaded is not None:
            self.cascade, self.gate = loaded
        self._backend = self.cascade or self._load_backend(path, threads)

    # --- backends ---------------------------------------------------------------
    def _load_backend(self, path: Path, threads: int | None):
        if path.suffix in (".keras", ".h5"):
            from .keras_backend import KerasBackend

            return KerasBackend(path, self.card)
        return OnnxBackend(path, threads)

    def run(self, batch: np.ndarray):
        """Raw outputs (logits, cam|None, embedding|None) for a preprocessed batch."""
        with stage("model"):
            return self._backend(np.ascontiguousarray(batch, dtype=np.float32))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        z = logits / self.temperature
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def preprocess(self, image: DecodedImage) -> np.ndarray:
        return preprocess(image.gray, self.spec)

    # --- the whole path -----------------------------------------------------------
    def predict(self, source, heatmap: bool | str = True, name: str = "", check_ood: bool = True,
                heatmap_class: str | None = None) -> Prediction:
        """Classify one upload (path, bytes or file object); refusals come back as a refused Prediction."""
        return self.predict_batch([source], heatmap, [name], check_ood, heatmap_class)[0]

    def predict_batch(self, sources: list, heatmap: bool | str = True, names: list[str] | None = None,
                      check_ood: bool = True, heatmap_class: str | None = None) -> list[Prediction]:
        """Classify several uploads with one model run (faster per image than one by one).

        Each image is decoded and checked on its own, so one bad file refuses only
        itself. ``elapsed_ms`` of each is the batch's time divided by its size. The heatmap is the most
        probable class's, or ``heatmap_class``'s (e.g. where the model sees tuberculosis on a film it calls
        normal).
        """
        if heatmap_class is not None and heatmap_class not in self.classes:
            raise ValueError(f"no class {heatmap_class!r} in this model: it knows {', '.join(self.classes)}")
        t0 = time.perf_counter()
        names = names or [""] * len(sources)
        prepared = [self.prepare(source, name, check_ood) for source, name in zip(sources, names)]
        ready = [p for p in prepared if p.x is not None]
        if ready:
            logits, cams, embs = self.run(np.stack([p.x for p in ready]))
            probs = self.probabilities(logits)
            scores = self.gate_scores(ready, embs)
            for i, p in enumerate(ready):
                self.finish(p, probs[i], None if cams is None else cams[i], None if scores is None else scores[i], heatmap,
                            heatmap_class)
        per_image = (time.perf_counter() - t0) * 1000 / max(1, len(sources))
        for p in prepared:
            p.pred.elapsed_ms = per_image
        return [p.pred for p in prepared]

    def prepare(self, source, name: str = "", check_ood: bool = True) -> "Prepared":
        """Decode, check and preprocess one upload: the per-image work before the
        model runs (a refusal here leaves ``x`` None)."""
        pred = Prediction(file=name or (str(source) if isinstance(source, (str, Path)) else ""),
                          model=self.name, version=self.version)
        try:
            if isinstance(source, DecodedImage):
                image = source
            else:
                with stage("decode"):
                    image = decode(source)
            with stage("checks"):
                if check_ood:
                    ood.check_image(image.gray, image.colorfulness)
                thumb = ood.thumbnail(image.gray) if check_ood and self.gate is not None else None
            with stage("preprocess"):
                x = self.preprocess(image)
            return Prepared(pred, image, x, thumb)
        except Refusal as r:
            pred.refused, pred.refusal = True, r.to_dict()
            return Prepared(pred, None, None)

    def gate_scores(self, prepared: list["Prepared"], embs) -> np.ndarray | None:
        """The refusal gate's scores for a batch at once (one matrix product, not one per image);
        NaN where the gate does not apply."""
        if self.gate is None or embs is None:
            return None
        scores = np.full(len(prepared), np.nan)
        idx = [i for i, p in enumerate(prepared) if p.thumb is not None]
        if idx:
            with stage("gate"):
                scores[idx] = self.gate.score(np.asarray(embs)[idx], np.stack([prepared[i].thumb for i in idx]))
        return scores

    def finish(self, p: "Prepared", probs: np.ndarray, cam, ood_score: float | None = None, heatmap: bool | str = True,
               heatmap_class: str | None = None) -> Prediction:
        """The per-image work after the model ran: the refusal gate's verdict, label, heatmap. ``heatmap="map"``
        keeps the class map and its box but draws no picture: a web app that draws it when first viewed spares
        the upload the overlay and the PNG (``gradcam.render``)."""
        pred = p.pred
        if ood_score is not None and not np.isnan(ood_score):
            pred.ood_score = float(ood_score)
            if pred.ood_score > self.gate.threshold:
                pred.refused, pred.refusal = True, Refusal("not_chest_xray").to_dict()
                return pred
        k = int(probs.argmax())
        pred.label = self.classes[k]
        pred.probabilities = {c: float(v) for c, v in zip(self.classes, probs)}
        pred.margin = margin(probs)
        pred.uncertain = self.uncertainty.is_uncertain(probs)
        pred.triage = self.triage.assess(pred.probabilities)
        if heatmap and cam is not None:
            with stage("heatmap"):
                pred.heatmap = gradcam.normalize_cam(cam[k if heatmap_class is None else self.classes.index(heatmap_class)])
                pred.heatmap_box = tuple(int(v) for v in view_box(p.image.gray, self.spec))
                pred.heatmap_shape = tuple(p.image.gray.shape)
                if heatmap == gradcam.MAP_ONLY:
                    return pred
                shown = gradcam.overlay(p.image.gray, pred.heatmap, box=pred.heatmap_box)
            with stage("png"):
                pred.heatmap_png = gradcam.to_png(shown)
        return pred
