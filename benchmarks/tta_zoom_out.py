"""Test-time augmentation experiment: mean logits over the X-ray as taken and zoomed out.

    python -m benchmarks.tta_zoom_out [--model weights/cxr-screen.onnx] [--zooms 0.88 0.94]

Kermany's test normals are framed tighter than its training normals, so a wider
second view looked like a cheap fix. Prints, per candidate (temperature refitted
on validation): validation loss as taken and averaged over framings 1, 1.2 and
1.4x (the release rule's numbers), then accuracy, loss and ROC-AUC on the run's
test split and the Kermany official test. Results in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from model_training.data.augmentation import warp
from model_training.data.datasets import load_spec, splits_beside
from model_training.evaluation.calibration import calibrated_probs, fit_temperature, nll
from model_training.evaluation.framing import FACTORS, tighter
from uplink_server.imaging import decode
from uplink_server.model import Classifier, default_model_path
from uplink_server.preprocessing import preprocess, resize_gray


def view_logits(clf: Classifier, records, zooms: tuple[float, ...], framing: float = 1.0,
                batch: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits (n, 1 + len(zooms), classes): the image as taken, then each zoomed-out view."""
    spec, views, out = clf.spec, [], []
    for r in records:
        gray = decode(r.path).gray
        g = resize_gray(tighter(gray, framing) if framing != 1 else gray, spec.size, spec.resample)
        views += [preprocess(g, spec)] + [preprocess(warp(g, zoom=z), spec) for z in zooms]
        if len(views) >= batch:
            out.append(clf.run(np.stack(views))[0])
            views = []
    if views:
        out.append(clf.run(np.stack(views))[0])
    y = np.array([clf.classes.index(r.label) for r in records])
    return np.concatenate(out).reshape(len(records), 1 + len(zooms), -1), y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--zooms", type=float, nargs="+", default=[0.88, 0.94])
    args = ap.parse_args()
    clf, zooms = Classifier(args.model), tuple(args.zooms)
    split_csv = splits_beside(Path(args.model))
    if split_csv is None:
        raise SystemExit(f"{args.model} has no splits manifest beside it: its validation and test images are unknown")
    run = load_spec(str(split_csv))
    val = [r for r in run if r.split == "val"]
    framed = {f: view_logits(clf, val, zooms, f) for f in (1.0, *FACTORS)}
    tests = {"run test": view_logits(clf, [r for r in run if r.split == "test"], zooms),
             "Kermany test": view_logits(clf, [r for r in load_spec("public")
                                               if r.split == "test" and r.source == "kermany"], zooms)}
    normal = clf.classes.index("normal")
    for k, name in [(None, "as taken only"), *((i + 1, f"+ zoom {z}") for i, z in enumerate(zooms))]:
        def mean(L):
            return L[:, 0] if k is None else (L[:, 0] + L[:, k]) / 2
        T = fit_temperature(mean(framed[1.0][0]), framed[1.0][1])
        losses = [nll(mean(L), y, T) for L, y in framed.values()]
        line = f"{name:14s} T {T:.3f} | val loss {losses[0]:.4f}, framing mean {np.mean(losses):.4f}"
        for tname, (L, y) in tests.items():
            p = calibrated_probs(mean(L), T)
            auc = roc_auc_score(y != normal, 1 - p[:, normal])
            line += f" | {tname}: acc {(p.argmax(1) == y).mean():.4f} loss {nll(mean(L), y, T):.4f} normal-vs-rest AUC {auc:.4f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
