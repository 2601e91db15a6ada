"""Did the model learn "blurry means tuberculosis"? Sharp held-out films, as stored and stored at 128 px.

    python -m benchmarks.resolution_check [--model weights/cxr-screen.onnx] [--per-source 150]

The TB programme's films (tb/) are 128x128; every other source is sharper. Each held-out film (the model's test
split) of the sharp sources is classified as it is, then squashed to 128x128 (the third-party resize the TB films
went through) and classified again. A model that learnt resolution as a cue calls the degraded films
tuberculosis far more often; one that did not gives the same call. Prints, per source: agreement of the class and
of the triage decision, the share called tuberculosis before and after, and the mean change of p(tuberculosis)
and of the triage score.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from uplink_server.imaging import DecodedImage, decode
from uplink_server.model import Classifier, default_model_path

TB_SIZE = 128


def stored_at(image: DecodedImage, size: int = TB_SIZE) -> DecodedImage:
    """The film as a third party that resized it to ``size`` x ``size`` (aspect not kept) would have stored it."""
    g = Image.fromarray((np.clip(image.gray, 0, 1) * 255).astype(np.uint8)).resize((size, size), Image.BOX)
    return DecodedImage(gray=np.asarray(g, np.float32) / 255.0, format=image.format)


def compare(clf: Classifier, paths: list[str]) -> dict:
    originals = [decode(p) for p in paths]
    before = clf.predict_batch(originals, heatmap=False, check_ood=False)
    after = clf.predict_batch([stored_at(im) for im in originals], heatmap=False, check_ood=False)
    tb = "tuberculosis" in clf.classes
    out = {"n": len(paths),
           "same_class": float(np.mean([a.label == b.label for a, b in zip(before, after)])),
           "same_triage": float(np.mean([a.triage["needs_read"] == b.triage["needs_read"] for a, b in zip(before, after)])),
           "triage_score_change": float(np.mean([b.triage["score"] - a.triage["score"] for a, b in zip(before, after)]))}
    if tb:
        out.update(tb_before=float(np.mean([a.label == "tuberculosis" for a in before])),
                   tb_after=float(np.mean([b.label == "tuberculosis" for b in after])),
                   p_tb_change=float(np.mean([b.probabilities["tuberculosis"] - a.probabilities["tuberculosis"]
                                              for a, b in zip(before, after)])))
    return out


def main() -> None:
    from model_training.data.datasets import load_spec, splits_beside

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--per-source", type=int, default=150)
    args = ap.parse_args()
    clf = Classifier(args.model)
    splits = splits_beside(Path(args.model))
    recs = [r for r in load_spec(str(splits)) if r.split == "test" and r.source != "tb"]
    by = defaultdict(list)
    for r in recs:
        by[r.source].append(r.path)
    print(f"model {clf.name} {clf.version}: held-out films as stored vs squashed to {TB_SIZE}x{TB_SIZE}")
    print("| source | n | same class | same triage | triage score change | called TB before -> after | p(TB) change |")
    print("|---|---|---|---|---|---|---|")
    for src, paths in sorted(by.items()):
        random.Random(0).shuffle(paths)
        m = compare(clf, paths[:args.per_source])
        tb = (f"{m['tb_before']:.1%} -> {m['tb_after']:.1%} | {m['p_tb_change']:+.3f}" if "tb_before" in m else "- | -")
        print(f"| {src} | {m['n']} | {m['same_class']:.1%} | {m['same_triage']:.1%} | {m['triage_score_change']:+.3f} | {tb} |")


if __name__ == "__main__":
    main()
