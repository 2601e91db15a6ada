"""Training and torch-eager inference speed per architecture on this machine.

    python -m benchmarks.bench_training [--archs vgg16,inception_v3,efficientnet_lite0] [--batch 8]

Prints images/s for: a training step with the backbone frozen (the study's
feature extractor), a full fine-tuning step, and eager inference.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch import nn

from model_training.networks.architectures import create_model


def bench(fn, images: int, min_seconds: float = 4.0, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds or n < 2:
        fn()
        n += 1
    return n * images / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="efficientnet_lite0,inception_v3,vgg16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, batch {args.batch}")
    print(f"{'architecture':20s} {'input':>6s} {'train frozen':>13s} {'train full':>11s} {'infer eager':>12s}   (images/s)")
    for name in args.archs.split(","):
        model, spec = create_model(name, 3, "none")
        x = torch.randn(args.batch, 3, spec.input_size, spec.input_size)
        y = torch.randint(0, 3, (args.batch,))
        loss_fn = nn.CrossEntropyLoss()

        def step(params):
            opt = torch.optim.SGD(params, lr=1e-4)

            def run():
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()

            return run

        for p in model.backbone.parameters():
            p.requires_grad = False
        model.train()
        frozen = bench(step(list(model.classifier.parameters())), args.batch, args.seconds)
        for p in model.backbone.parameters():
            p.requires_grad = True
        full = bench(step(list(model.parameters())), args.batch, args.seconds)
        model.eval()

        def infer():
            with torch.no_grad():
                model(x)

        eager = bench(infer, args.batch, args.seconds)
        print(f"{name:20s} {spec.input_size:6d} {frozen:13.1f} {full:11.1f} {eager:12.1f}", flush=True)


if __name__ == "__main__":
    main()
