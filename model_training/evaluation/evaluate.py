"""Evaluate any exported model (ONNX, or Keras with the extra) on any data spec,
through the server's own loading and preprocessing code."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from uplink_server.errors import Refusal
from uplink_server.imaging import decode
from uplink_server.model import Classifier
from uplink_server.ood import thumbnail

from ..data.datasets import check_files, load_spec
from . import plots
from .framing import tighter
from .metrics import binary_operating_point, split_metrics, summary_line


def select_split(records, split: str):
    if split == "all":
        return records
    if split == "auto":
        test = [r for r in records if r.split == "test"]
        return test or records
    return [r for r in records if r.split == split]


def predict_records(clf: Classifier, records, batch_size: int = 32, progress: bool = True, zoom: float = 1.0):
    """Raw logits (before temperature), embeddings (None without them) and gate thumbnails of the readable
    records, which come back as ``kept``; ``unreadable`` lists the others with the reason."""
    logits, embs, thumbs, kept, unreadable = [], [], [], [], []
    batch, batch_recs = [], []

    def flush():
        lg, _, emb = clf.run(np.stack(batch))
        logits.append(lg)
        if emb is not None:
            embs.append(emb)
        kept.extend(batch_recs)
        batch.clear()
        batch_recs.clear()

    for r in tqdm(records, desc="evaluate", disable=not progress):
        try:
            image = decode(r.path)
            if zoom != 1.0:
                image = replace(image, gray=tighter(image.gray, zoom))
            batch.append(clf.preprocess(image))
            if clf.gate is not None:
                thumbs.append(thumbnail(image.gray))
        except Refusal as exc:
            unreadable.append({"path": r.path, "reason": exc.message})
            continue
        batch_recs.append(r)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    n_out = len(clf.classes)
    return (np.concatenate(logits) if logits else np.zeros((0, n_out), np.float32),
            np.concatenate(embs) if embs else None, thumbs, kept, unreadable)


def predict_validation(model_path: Path, data: str | None = None, progress: bool = True):
    """(classifier, raw logits, kept records) of a model on its validation split: the one in ``data``, else in the
    splits manifest saved beside the model. What the uncertainty rule and the drift reference are chosen on."""
    from ..data.datasets import splits_beside

    clf = Classifier(model_path)
    spec = data or splits_beside(Path(model_path))
    if spec is None:
        raise FileNotFoundError(f"no splits manifest beside {model_path}; pass --data")
    records = [r for r in load_spec(str(spec)) if r.split == "val"]
    if not records:
        raise ValueError(f"{spec} has no validation split")
    logits, _, _, kept, _ = predict_records(clf, records, progress=progress)
    return clf, logits, kept


def evaluate(model_path: str | Path, data: list[str], split: str = "auto", out: Path | None = None,
             batch_size: int = 32, progress: bool = True, zoom: float = 1.0, cascade: bool = True) -> dict:
    """``zoom`` > 1 is the framing stress test: every image cropped that much tighter before preprocessing.
    ``cascade=False``: an ensemble whole, where its card ships a cascade (uplink_server.cascade)."""
    clf = Classifier(model_path, cascade=cascade)
    records = []
    for spec in data:
        records.extend(load_spec(spec))
    records = select_split(records, split)
    if not records:
        raise ValueError(f"no images in split {split!r} of {data}")
    check_files(records)
    unknown = sorted({r.label for r in records} - set(clf.classes))
    if unknown:
        raise ValueError(f"the data has classes the model does not know: {unknown} (model classes: {clf.classes})")
    logits, embs, thumbs, kept, unreadable = predict_records(clf, records, batch_size, progress, zoom)
    probs = clf.probabilities(logits)
    y = np.array([clf.classes.index(r.label) for r in kept])
    res = split_metrics(y, probs, clf.classes, kept)
    res["unreadable"] = unreadable
    # per image, for paired comparisons of two models on the same files (int8 vs fp32)
    res["predictions"] = [{"path": r.path, "predicted": clf.classes[int(k)]} for r, k in zip(kept, probs.argmax(1))]
    res["model"] = {"name": clf.name, "version": clf.version, "path": str(model_path)}
    res["data"] = {"specs": data, "split": split, **({"zoom": zoom} if zoom != 1.0 else {})}
    labels = set(r.label for r in kept)
    if "normal" in clf.classes and labels <= {"normal", "pneumonia"} and len(labels) == 2:
        # Kermany's question: normal vs abnormal (any other class counts as abnormal)
        p_abn = 1 - probs[:, clf.classes.index("normal")]
        y_abn = (y != clf.classes.index("normal")).astype(int)
        op = binary_operating_point(y_abn, p_abn)
        op["accuracy_at_0.5"] = float(((p_abn >= 0.5).astype(int) == y_abn).mean())
        res["normal_vs_abnormal"] = op
    if "covid19" in labels and len(labels) > 1:
        k = clf.classes.index("covid19")
        res["covid19_vs_rest"] = binary_operating_point((y == k).astype(int), probs[:, k])
    if embs is not None and clf.gate is not None:
        scores = clf.gate.score(embs, np.stack(thumbs))
        res["ood_refusal_rate"] = float((scores > clf.gate.threshold).mean())
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(res, indent=2))
        plots.confusion(res["confusion_matrix"], clf.classes, out / "confusion_matrix.png", "evaluation")
        plots.roc(y, probs, clf.classes, out / "roc.png", "evaluation")
    return res


def format_report(res: dict) -> str:
    zoom = f", framed {res['data']['zoom']:g}x tighter" if "zoom" in res["data"] else ""
    lines = [f"model {res['model']['name']} {res['model']['version']} on {'+'.join(res['data']['specs'])} ({res['data']['split']}{zoom})",
             summary_line(res)]
    for c, pc in res["per_class"].items():
        if pc["support"]:
            lines.append(f"  {c:10s} sens={pc['sensitivity']:.4f} spec={pc['specificity'] if pc['specificity'] is None else round(pc['specificity'], 4)} "
                         f"prec={pc['precision']:.4f} f1={pc['f1']:.4f} auc={pc['roc_auc'] if pc['roc_auc'] is None else round(pc['roc_auc'], 4)} n={pc['support']}")
    for key in ("normal_vs_abnormal", "covid19_vs_rest"):
        if key in res and res[key].get("roc_auc") is not None:
            op = res[key]
            extra = f" acc@0.5={op['accuracy_at_0.5']:.4f}" if "accuracy_at_0.5" in op else ""
            lines.append(f"  {key}: auc={op['roc_auc']:.4f} sens={op['sensitivity']:.4f} at spec={op['specificity']:.4f}{extra}")
    for src, m in res["by_source"].items():
        lines.append(f"  source {src}: n={m['n']} acc={m['accuracy']:.4f}")
    if "ood_refusal_rate" in res:
        lines.append(f"  would refuse as not a chest X-ray: {res['ood_refusal_rate']:.2%}")
    if res["unreadable"]:
        lines.append(f"  unreadable: {len(res['unreadable'])}")
    lines.append("confusion matrix (rows true, columns predicted " + "/".join(res["classes"]) + "):")
    lines += ["  " + " ".join(f"{v:5d}" for v in row) for row in res["confusion_matrix"]]
    return "\n".join(lines)
