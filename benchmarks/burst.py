"""The busy morning: N uploads at once against one started web app, while another user lists cases.

    python -m benchmarks.burst [--uploads 60] [--model weights/cxr-screen.onnx]

Starts ``python -m web_app serve`` (in-process model) on loopback, fires ``--uploads`` concurrent uploads of
real films, and meanwhile polls ``GET /api/v1/cases`` and ``/healthz`` as another user would. Prints the status
codes (target: only 200 and 503 with Retry-After, no 500), the slowest case list and health answers during the
burst, how many cases exist afterwards (target: one per upload) and how long until every pending one was
analysed by the resumer.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import httpx

from .bench_load import Stack, real_images


async def burst(base: str, token: str, images: list[bytes], n: int) -> dict:
    h = {"Authorization": f"Bearer {token}"}
    stop = asyncio.Event()
    probes = {"cases": [], "healthz": []}

    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        async def upload(i):
            t0 = time.perf_counter()
            r = await client.post("/api/v1/predict", files={"file": (f"f{i}.jpeg", images[i % len(images)], "image/jpeg")},
                                  data={"patient_code": f"BURST-{i}"}, headers=h)
            return r.status_code, r.headers.get("retry-after"), time.perf_counter() - t0

        async def probe():
            while not stop.is_set():
                for path, key in (("/api/v1/cases?limit=20", "cases"), ("/healthz", "healthz")):
                    t0 = time.perf_counter()
                    r = await client.get(path, headers=h)
                    probes[key].append((time.perf_counter() - t0, r.json().get("saturated") if key == "healthz" else None))
                await asyncio.sleep(0.1)

        p = asyncio.create_task(probe())
        t0 = time.perf_counter()
        results = await asyncio.gather(*(upload(i) for i in range(n)))
        wall = time.perf_counter() - t0
        stop.set()
        await p
    return {"results": results, "wall": wall, "probes": probes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uploads", type=int, default=60)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    images = real_images()
    stack = Stack(1, 0, True, None, args.model)
    try:
        out = asyncio.run(burst(stack.bases[0], stack.token, images, args.uploads))
        codes = Counter(c for c, _, _ in out["results"])
        retry = {ra for c, ra, _ in out["results"] if c == 503}
        slow = max(t for c, _, t in out["results"])
        print(f"{args.uploads} concurrent uploads in {out['wall']:.1f} s: status codes {dict(codes)}; "
              f"Retry-After on 503: {sorted(retry) or '-'}; slowest answer {slow:.1f} s")
        for key, vals in out["probes"].items():
            ts = [t for t, _ in vals]
            sat = sum(bool(s) for _, s in vals)
            print(f"  another user's GET {key}: {len(ts)} during the burst, slowest {max(ts):.2f} s"
                  + (f", saturated in {sat}" if key == "healthz" else ""))
        h = {"Authorization": f"Bearer {stack.token}"}
        t0 = time.perf_counter()
        while True:
            cases = httpx.get(stack.bases[0] + "/api/v1/cases", params={"limit": 1000}, headers=h, timeout=60).json()
            pending = sum(c["status"] == "pending" for c in cases)
            if not pending or time.perf_counter() - t0 > 300:
                break
            time.sleep(1)
        print(f"  cases afterwards: {len(cases)} for {args.uploads} uploads; all analysed {time.perf_counter() - t0:.1f} s "
              f"after the burst (pending left: {pending})")
    finally:
        stack.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
