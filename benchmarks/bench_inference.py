"""Serving speed on this machine: the whole path, and batch throughput.

    python -m benchmarks.bench_inference [--model weights/cxr-screen.onnx] [--int8 weights/cxr-screen.int8.onnx]

Single image: decode + preprocess + inference + heatmap (p50/p95 over real
X-rays from ../shared/data). Batch: images/s through ONNX Runtime (one
single-threaded session per core, as the server runs batches, and one session
using every core), files to results through ``predict_batch``, and the same
network in torch eager for comparison (if torch is installed).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from pathlib import Path

import numpy as np

from uplink_server.imaging import decode
from uplink_server.model import Classifier, default_model_path

DATA = Path(os.environ.get("CXR_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data"))


def real_images(n: int) -> list[Path]:
    rows = []
    for name in ("kermany", "covid", "radiography"):
        with open(DATA / name / "labels.csv") as fh:
            rows += [DATA / name / r["path"] for r in list(csv.DictReader(fh))[:: 97]]
    return rows[:n]


def latency(clf: Classifier, files: list[Path]) -> tuple[float, float]:
    clf.predict(files[0])  # warm up
    times = []
    for f in files:
        t0 = time.perf_counter()
        clf.predict(f, heatmap=True)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def batcher_latency(clf: Classifier, files: list[Path]) -> tuple[float, float]:
    """Requests one after another, as on an idle server: the window must not add latency."""
    import asyncio

    from uplink_server.batching import DynamicBatcher

    batcher = DynamicBatcher(clf)

    async def go():
        await batcher.predict(files[0].read_bytes())
        times = []
        for f in files:
            data = f.read_bytes()
            t0 = time.perf_counter()
            await batcher.predict(data)
            times.append((time.perf_counter() - t0) * 1000)
        return times

    times = asyncio.run(go())
    batcher.close()
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def throughput(run, batch: np.ndarray, seconds: float = 5.0) -> float:
    run(batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(batch)
        n += len(batch)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--int8", default=None, help="int8 model to compare (default: <model>.int8.onnx if present)")
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    files = real_images(args.images)
    print(f"# {platform.machine()}, {os.cpu_count()} cores; {len(files)} real X-rays; batch {args.batch}")
    int8 = args.int8 or str(Path(args.model).with_suffix("")) + ".int8.onnx"
    models = [("fp32", args.model)] + ([("int8", int8)] if Path(int8).is_file() else [])
    batch = None
    for tag, path in models:
        clf = Classifier(path)
        p50, p95 = latency(clf, files)
        b50, b95 = batcher_latency(clf, files)
        print(f"onnxruntime {tag}: one request at a time through the dynamic batcher (5 ms window): "
              f"p50 {b50:.1f} ms, p95 {b95:.1f} ms (direct: {p50:.1f} / {p95:.1f})")
        if batch is None:
            imgs = [clf.preprocess(decode(f)) for f in files]
            batch = np.stack((imgs * (args.batch // len(imgs) + 1))[: args.batch])
        ips = throughput(lambda b: clf.run(b), batch)
        # a cascade (uplink_server.cascade) has a session per member and no single all-core session to compare
        one = throughput(lambda b: clf._backend._run(clf._backend.sess, b), batch) if clf.cascade is None else None
        e2e = throughput(lambda b: clf.predict_batch(files[: len(b)], heatmap=False), batch)
        alone = "" if clf.cascade is None else (f"; cascade: the first network alone on "
                                                f"{clf.cascade.status()['share_alone']:.0%} of the films")
        print(f"onnxruntime {tag}: single image with heatmap p50 {p50:.1f} ms, p95 {p95:.1f} ms; "
              f"batch {ips:.1f} images/s" + ("" if one is None else f" (one all-core session: {one:.1f})") +
              f"; files to results (decode + preprocess + inference + gate, no heatmap) {e2e:.1f} images/s{alone}")
    try:
        import torch

        from model_training.networks.architectures import create_model
    except ImportError:
        print("torch eager: not installed (serving does not need it)")
        return
    clf = Classifier(args.model)
    # an ensemble runs each member's network: time them all, one after another
    archs = [m["architecture"] for m in clf.card.get("members", [])] or [clf.card["architecture"]]
    models = [create_model(a, len(clf.classes), "none")[0].eval() for a in archs]
    torch.set_num_threads(os.cpu_count() or 1)

    def run_torch(b):
        with torch.no_grad():
            for model in models:
                model.forward_all(torch.from_numpy(b))

    print(f"torch eager fp32: batch {throughput(run_torch, batch):.1f} images/s")


if __name__ == "__main__":
    main()
