"""Would a larger input help without retraining? Triage ROC-AUC per source on held-out patients at other input sizes.

The exported file's input is fixed at its training size, so the model's own weights are put back into its torch
network (``model_training.networks.onnx_weights``), which takes any size; at the training size it reproduces the card's
numbers. Needs the training extra (torch, timm).

    python -m benchmarks.test_time_size --sizes 224,256,288
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    import torch
    from sklearn.metrics import roc_auc_score

    from model_training.data.datasets import load_spec, splits_beside
    from model_training.data.labels import NORMAL
    from model_training.networks.architectures import create_model
    from model_training.networks.onnx_weights import load_onnx_weights
    from uplink_server.imaging import decode
    from uplink_server.model import Classifier
    from uplink_server.preprocessing import preprocess

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="weights/cxr-screen-tb.onnx")
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--sizes", default="224,256,288")
    ap.add_argument("--sources", default="nih,tb,kermany")
    args = ap.parse_args(argv)
    clf = Classifier(Path(args.model))
    net, _ = create_model(args.arch, num_classes=len(clf.classes))
    load_onnx_weights(net, args.model)
    net.eval()
    sources = args.sources.split(",")
    recs = [r for r in load_spec(str(splits_beside(Path(args.model)))) if r.split == "test" and r.source in sources]
    grays = [decode(r.path).gray for r in recs]
    src = np.array([r.source for r in recs])
    abnormal = np.array([r.label != NORMAL for r in recs])
    print(f"{args.model}: {len(recs)} held-out films of {', '.join(sources)}; triage ROC-AUC (1 - p(normal))")
    for size in (int(s) for s in args.sizes.split(",")):
        spec = dataclasses.replace(clf.spec, size=(size, size))
        t0, logits = time.time(), []
        with torch.no_grad():
            for i in range(0, len(grays), 32):
                out = net(torch.from_numpy(np.stack([preprocess(g, spec) for g in grays[i:i + 32]])))
                logits.append((out[0] if isinstance(out, tuple) else out).numpy())
        score = 1 - clf.probabilities(np.concatenate(logits))[:, clf.classes.index(NORMAL)]
        aucs = {s: round(float(roc_auc_score(abnormal[src == s], score[src == s])), 4) for s in sources}
        print(f"  {size} px: {aucs} ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
