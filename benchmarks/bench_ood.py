"""How well the refusal gate separates chest X-rays from everything else.

    python -m benchmarks.bench_ood [--model weights/cxr-screen.onnx] [--data all]

Prints the share of the non-chest set refused (benchmarks/non_chest.py; target: every image refused
that the shipped gate refused before), and per source the share of real chest X-rays refused (target
<= 1 % on every source): the model's held-out test split, and with ``--data`` every image of those
sources (training images included: a film the model was trained on must pass too).
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

from uplink_server.model import Classifier, default_model_path

from .non_chest import non_chest_images


def held_out_xrays(model_path: Path, every: int = 1) -> list[str]:
    """Real X-rays that the model and its gate never saw: its test split."""
    return [r.path for r in held_out_records(model_path)][::every]


def held_out_records(model_path: Path):
    from model_training.data.datasets import DataError, load_spec, splits_beside

    splits = splits_beside(model_path)
    if splits is None:
        raise DataError(f"{model_path} has no splits manifest beside it: its held-out X-rays are unknown")
    return [r for r in load_spec(str(splits)) if r.split == "test"]


def refused_xrays(clf: Classifier, paths: list[str], batch: int = 32) -> list[str]:
    out = []
    for i in range(0, len(paths), batch):  # batches: the gate's verdict is per image either way
        chunk = paths[i:i + batch]
        out += [p for p, pred in zip(chunk, clf.predict_batch(chunk, heatmap=False)) if pred.refused]
    return out


def refusals_by_source(clf: Classifier, records) -> dict[str, tuple[int, int]]:
    """{source: (refused, n)}."""
    refused = set(refused_xrays(clf, [r.path for r in records]))
    out = defaultdict(lambda: [0, 0])
    for r in records:
        out[r.source][0] += r.path in refused
        out[r.source][1] += 1
    return {s: tuple(v) for s, v in sorted(out.items())}


def accepted_non_chest(clf: Classifier, images: dict[str, bytes]) -> list[str]:
    return [n for n, b in images.items() if not clf.predict(b, heatmap=False, name=n).refused]


def _print_sources(title: str, counts: dict) -> None:
    print(title)
    for s, (k, n) in counts.items():
        flag = "" if k <= 0.01 * n else "  <-- above 1 %"
        print(f"  {s:18s} {k:4d}/{n:5d} = {100 * k / n:5.2f} %{flag}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--data", default=None, help="also every image of these sources (e.g. all, nih+tb)")
    args = ap.parse_args()
    clf = Classifier(args.model)
    print(f"model {clf.name} {clf.version}, gate threshold {clf.gate.threshold if clf.gate else None}")
    images = non_chest_images()
    accepted = accepted_non_chest(clf, images)
    codes = Counter(clf.predict(b, heatmap=False).refusal["code"] for n, b in images.items() if n not in accepted)
    print(f"non-chest images refused: {len(images) - len(accepted)}/{len(images)} "
          f"= {100 * (1 - len(accepted) / len(images)):.1f} % (target >= 99 %); by reason {dict(codes)}")
    if accepted:
        print("  accepted:", ", ".join(accepted))
    held = refusals_by_source(clf, held_out_records(Path(args.model)))
    k, n = sum(v[0] for v in held.values()), sum(v[1] for v in held.values())
    _print_sources(f"held-out chest X-rays refused: {k}/{n} = {100 * k / n:.2f} % (target <= 1 % per source)", held)
    if args.data:
        from model_training.data.datasets import load_spec

        _print_sources(f"every chest X-ray of {args.data} refused, per source:", refusals_by_source(clf, load_spec(args.data)))


if __name__ == "__main__":
    main()
