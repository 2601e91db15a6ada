"""Does refitting only a model's last layer help a source it is weak on? (BENCHMARKS.md, "Refitting only the last layer")

    python -m benchmarks.head_refit [--model weights/cxr-screen-tb.onnx] [--with-imagenet] [--cache /tmp/head_refit]

Takes the model's own embeddings of every film in its split (``Classifier.run``; about 5 minutes for 16,000 films on
2 cores, cached), fits each recipe of ``model_training.evaluation.heads`` on the train split and on the validation split, and
prints triage ROC-AUC (1 - p(normal)) per source on held-out patients (the test split) beside the model's own head.
``--with-imagenet`` adds heads on frozen ImageNet EfficientNet-Lite0 features, alone and beside the model's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("kermany", "nih", "tb", "radiography")


def embeddings(model: Path, cache: Path) -> dict:
    from model_training.data.datasets import load_spec
    from model_training.evaluation.evaluate import predict_records
    from uplink_server.model import Classifier

    out = cache / f"{model.stem}.npz"
    if out.is_file():
        return dict(np.load(out))
    clf = Classifier(model)
    clf.gate = None  # every film, refused or not
    recs = load_spec(str(model.with_suffix(".splits.csv")))
    logits, emb, _, kept, _ = predict_records(clf, recs, batch_size=64)
    d = {"logits": logits, "emb": emb, "label": np.array([r.label for r in kept]),
         "split": np.array([r.split for r in kept]), "source": np.array([r.source for r in kept]),
         "age": np.array([r.age_group for r in kept]), "path": np.array([r.path for r in kept]),
         "classes": np.array(clf.classes)}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(out, **d)
    return d


def imagenet_features(model: Path, paths: np.ndarray, cache: Path) -> np.ndarray:
    import json

    from model_training.data.datasets import load_spec
    from model_training.evaluation.features import extract
    from uplink_server.preprocessing import PreprocessSpec

    card = json.loads(model.with_suffix(".card.json").read_text())
    recs = {r.path: r for r in load_spec(str(model.with_suffix(".splits.csv")))}
    feats = extract(list(recs.values()), PreprocessSpec.from_dict(card["preprocessing"]), cache_dir=cache / "imagenet")
    return feats.of([recs[p] for p in paths])


def scores(d: dict, logits: np.ndarray) -> dict:
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    classes = list(d["classes"])
    y = np.array([classes.index(c) for c in d["label"]])
    test = d["split"] == "test"
    row = {}
    for s in (*SOURCES, "all"):
        m = test & ((d["source"] == s) if s != "all" else True)
        if len(set(y[m] != 0)) == 2:
            row[s] = roc_auc_score(y[m] != 0, 1 - p[m, classes.index("normal")])
    row["test acc"] = float((p[test].argmax(1) == y[test]).mean())
    row["COVID-19 AUC"] = roc_auc_score(y[test] == classes.index("covid19"), p[test, classes.index("covid19")])
    k = test & (d["source"] == "kermany")
    row["Kermany acc"] = float((p[k].argmax(1) == y[k]).mean())
    return row


def main() -> None:
    from model_training.evaluation.heads import Head

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "weights" / "cxr-screen-tb.onnx")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/head_refit"))
    ap.add_argument("--with-imagenet", action="store_true")
    args = ap.parse_args()
    d = embeddings(args.model, args.cache)
    classes = list(d["classes"])
    y = np.array([classes.index(c) for c in d["label"]])
    inputs = {"model's embedding": d["emb"]}
    if args.with_imagenet:
        im = imagenet_features(args.model, d["path"], args.cache)
        inputs.update({"ImageNet features": im, "model's + ImageNet": np.concatenate([d["emb"], im], 1)})
    rows = [("the model's own head", scores(d, d["logits"]))]
    for name, X in inputs.items():
        for recipe in ("erm", "group", "source", "dro"):
            for wd in (1e-3, 1e-2, 1e-1):
                for on in ("train", "val"):
                    m = d["split"] == on
                    head = Head(recipe, n_classes=len(classes), weight_decay=wd).fit(
                        X[m], y[m], list(d["source"][m]), list(d["age"][m]))
                    rows.append((f"{name}: {recipe}, wd {wd:g}, fitted on {on}", scores(d, head.logits(X))))
    keys = list(rows[0][1])
    print("| head | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in rows:
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" if k in row else "-" for k in keys) + " |", flush=True)


if __name__ == "__main__":
    main()
