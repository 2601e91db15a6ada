"""How well the refusal gate separates chest X-rays from everything else.

    python -m benchmarks.bench_ood [--model weights/cxr-screen.onnx]

Prints the share of real held-out chest X-rays refused (the model's own test
split, every source; target <= 1 %) and the share of the non-chest set refused
(benchmarks/non_chest.py; target >= 99 %), with the names of the mistakes.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from uplink_server.model import Classifier, default_model_path

from .non_chest import non_chest_images


def held_out_xrays(model_path: Path, every: int = 1) -> list[str]:
    """Real X-rays that the model and its gate never saw: its test split."""
    from model_training.datasets import DataError, load_spec, splits_beside

    splits = splits_beside(model_path)
    if splits is None:
        raise DataError(f"{model_path} has no splits manifest beside it: its held-out X-rays are unknown")
    return [r.path for r in load_spec(str(splits)) if r.split == "test"][::every]


def refused_xrays(clf: Classifier, paths: list[str]) -> list[str]:
    return [p for p in paths if clf.predict(p, heatmap=False).refused]


def accepted_non_chest(clf: Classifier, images: dict[str, bytes]) -> list[str]:
    return [n for n, b in images.items() if not clf.predict(b, heatmap=False, name=n).refused]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(default_model_path()))
    args = ap.parse_args()
    clf = Classifier(args.model)
    images = non_chest_images()
    accepted = accepted_non_chest(clf, images)
    codes = Counter(clf.predict(b, heatmap=False).refusal["code"] for n, b in images.items() if n not in accepted)
    print(f"non-chest images refused: {len(images) - len(accepted)}/{len(images)} "
          f"= {100 * (1 - len(accepted) / len(images)):.1f} % (target >= 99 %); by reason {dict(codes)}")
    if accepted:
        print("  accepted:", ", ".join(accepted))
    paths = held_out_xrays(Path(args.model))
    refused = refused_xrays(clf, paths)
    print(f"held-out chest X-rays refused: {len(refused)}/{len(paths)} = {100 * len(refused) / len(paths):.2f} % "
          f"(target <= 1 %)")


if __name__ == "__main__":
    main()
