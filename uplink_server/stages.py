"""Where a served image's time goes: process-wide totals per stage.

Every stage of the serving path (upload parsing, decode, de-identification and storage, preprocessing, the
refusal gate, the model, the heatmap, PNG encoding, the database) adds its wall time here; the web app shows
the totals at ``GET /api/v1/stages`` and ``python -m benchmarks.bench_load`` turns the difference over a run
into milliseconds per answer. Each stage keeps its wall time and its thread's CPU time: under load the wall time
includes waiting (for the GIL, a lock, a core), the CPU time is what the stage costs the machine (the model's
own worker threads excepted: its CPU shows in the process's total). A stage costs four clock reads and a lock.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

# The order a request meets them, for reports.
ORDER = ("upload", "decode", "deidentify", "store", "statistics", "checks", "preprocess", "queue", "model", "gate", "heatmap",
         "png", "database")


class StageClock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        self._cpu: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def add(self, name: str, seconds: float, cpu_seconds: float = 0.0, count: int = 1) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds
            self._cpu[name] = self._cpu.get(name, 0.0) + cpu_seconds
            self._count[name] = self._count.get(name, 0) + count

    @contextmanager
    def time(self, name: str):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0, time.thread_time() - c0)

    def snapshot(self) -> dict[str, dict]:
        """{stage: {"seconds": wall total, "cpu_seconds": the thread's CPU total, "count": times entered}}, in the
        order a request meets them."""
        with self._lock:
            names = [n for n in ORDER if n in self._seconds] + sorted(set(self._seconds) - set(ORDER))
            return {n: {"seconds": round(self._seconds[n], 6), "cpu_seconds": round(self._cpu[n], 6),
                        "count": self._count[n]} for n in names}

    def reset(self) -> None:
        with self._lock:
            self._seconds.clear()
            self._cpu.clear()
            self._count.clear()


CLOCK = StageClock()
stage = CLOCK.time


def per_answer(before: dict, after: dict, answers: int, key: str = "seconds") -> dict[str, float]:
    """Milliseconds per answer spent in each stage between two snapshots (``key``: "seconds" for wall time,
    "cpu_seconds" for CPU time)."""
    out = {}
    for name, v in after.items():
        s = v.get(key, 0.0) - before.get(name, {}).get(key, 0.0)
        if s > 0:
            out[name] = 1000 * s / max(1, answers)
    return out
