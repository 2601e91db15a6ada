"""ONNX Runtime sessions behind ``backend(x) -> (logits, cam|None, embedding|None)``: which execution providers,
how many threads, and a batch split across one single-threaded session per core."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from .errors import ModelNotFound


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset/cpuset limits, unlike cpu_count
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# Accelerators first, the CPU always last. Not "whatever is available": recent onnxruntime wheels list the
# AzureExecutionProvider (remote inference) first, which made every session look like a non-CPU one.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider",
                       "CoreMLExecutionProvider", "CPUExecutionProvider")


def execution_providers() -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]


class OnnxBackend:
    """ONNX Runtime sessions behind ``backend(x) -> (logits, cam|None, embedding|None)``.

    A single image runs in one session using every core (lowest latency). A
    batch is split across one single-threaded session per core: on 2 cores this
    matched one 2-thread session on an idle machine and gave about 20 % more
    images/s while training shared the CPU (EfficientNet's small depthwise
    convolutions parallelise poorly inside one run; benchmarks/bench_inference.py).
    """

    MAX_WORKERS = 8

    def __init__(self, path: Path, threads: int | None = None):
        self.path = path
        self.threads = threads or _usable_cores()
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        try:
            self.sess = self._session(threads or 0)  # 0: ONNX Runtime picks (physical cores)
        except (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail) as exc:
            # a truncated copy or another file under the model's name: every caller's "no usable model" path
            raise ModelNotFound(f"{path} is not a readable ONNX model ({exc}); copy it again or pass another "
                                "--model") from None
        self.names = [o.name for o in self.sess.get_outputs()]
        self.input_name = self.sess.get_inputs()[0].name
        self._workers: list = []
        self._pool = None
        self._lock = threading.Lock()

    def _session(self, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # a server shares its cores with decoding, heatmaps and the web app: idle
        # threads must sleep, not spin (spinning cost a third of the CPU under load)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(self.path), sess_options=opts, providers=execution_providers())

    def _run(self, sess, x: np.ndarray):
        outs = dict(zip(self.names, sess.run(None, {self.input_name: x})))
        return outs.get("logits", outs[self.names[0]]), outs.get("cam"), outs.get("embedding")

    def _start_workers(self) -> None:
        with self._lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                n = min(self.threads, self.MAX_WORKERS)
                self._workers = [self._session(1) for _ in range(n)] if n > 1 else []
                self._pool = ThreadPoolExecutor(max(1, n), thread_name_prefix="onnx")

    def __call__(self, x: np.ndarray):
        if len(x) < 2 or self.threads < 2 or "CPUExecutionProvider" != self.sess.get_providers()[0]:
            return self._run(self.sess, x)  # one image, one core, or a GPU: one session
        self._start_workers()
        chunks = np.array_split(x, min(len(self._workers), len(x)))
        parts = list(self._pool.map(lambda wc: self._run(*wc), zip(self._workers, chunks)))
        return tuple(None if p[0] is None else np.concatenate(p) for p in zip(*parts))
