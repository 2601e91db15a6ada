"""Dynamic batching: concurrent requests share one model run.

Modelled on Triton's dynamic batcher. Each request decodes and preprocesses its
image on a thread of its own (that work is per image and runs in parallel),
then queues its input tensor. A model thread takes what is queued, up to
``max_batch``, and when more requests are still being prepared waits at most
``max_delay_ms`` for them, then runs them as one ONNX batch. The gate and the
heatmap are finished per image again. A request on an idle server never waits:
with nothing else in preparation it runs at once, alone.

``runs`` batches may be in the model at once (by default two, one for a model held to one core). In a web
app's own process one run left a core idle a quarter of the time (a batch's chunks finish unevenly, the gate
and the GIL-bound web work around it), while the model was the queue everyone waited in; a second batch fills
those gaps (1.5.0: 39-40 -> 50-51 answers/s). A new batch is formed only when a run is free, so batches still
grow while the model is busy. A model server fed by a broker keeps one (``uplink_server connect``): there two
runs made smaller batches and fewer answers.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from .model import Classifier, Prediction

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_DELAY_MS = 5.0
DEFAULT_RUNS = 2

# set by DynamicBatcher.expecting() for the task whose request is on its way
_ticket: contextvars.ContextVar = contextvars.ContextVar("batch_ticket", default=None)


class DynamicBatcher:
    def __init__(self, classifier: Classifier, max_batch: int = DEFAULT_MAX_BATCH,
                 max_delay_ms: float = DEFAULT_MAX_DELAY_MS, workers: int | None = None, runs: int | None = None):
        if runs is None:  # a model held to one core (--threads 1, CXR_MODEL_THREADS=1) runs one batch at a time
            runs = 1 if getattr(classifier, "threads", None) == 1 else DEFAULT_RUNS
        if max_batch < 1 or max_delay_ms < 0 or runs < 1:
            raise ValueError("max_batch and runs must be >= 1 and max_delay_ms >= 0")
        self.classifier = classifier
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.runs = runs
        # per-image work (decode, preprocess, heatmap) in parallel; the model at most `runs` batches at a time
        self._prep = ThreadPoolExecutor(workers or max(2, (os.cpu_count() or 2)), thread_name_prefix="prepare")
        self._model = ThreadPoolExecutor(runs, thread_name_prefix="model")
        self._queue: asyncio.Queue | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self.peak_runs = 0  # most batches seen in the model at once
        self._in_model = 0
        self._loop = None
        self._worker: asyncio.Task | None = None
        self._preparing = 0  # requests decoding or preprocessing, or announced by expecting()
        self.batch_sizes: Counter = Counter()  # batch size -> how many batches ran
        self.served = 0
        self.model_s = 0.0  # time spent in model runs, summed over concurrent runs
        self._model_lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.classifier.name

    @property
    def version(self) -> str:
        return self.classifier.version

    def status(self) -> dict:
        runs = sum(self.batch_sizes.values())
        return {"max_batch": self.max_batch, "max_delay_ms": self.max_delay * 1000, "concurrent_runs": self.runs, "served": self.served,
                "batches": runs, "model_s": round(self.model_s, 2), "mean_batch": round(sum(k * v for k, v in self.batch_sizes.items()) / runs, 2) if runs else 0.0,
                "queued": self._queue.qsize() if self._queue is not None else 0,
                "cascade": self.classifier.cascade.status() if self.classifier.cascade is not None else None}

    @contextmanager
    def expecting(self):
        """Announce a request that will reach ``predict`` soon (its upload is still being
        stored): a batch being formed waits for it, within the window. Only until it
        arrives, so an announced request waiting alone does not wait for itself."""
        ticket = [True]
        self._preparing += 1
        token = _ticket.set(ticket)
        try:
            yield
        finally:
            _ticket.reset(token)
            if ticket[0]:
                self._preparing -= 1

    def _arrived(self) -> None:
        ticket = _ticket.get()
        if ticket is not None and ticket[0]:
            ticket[0] = False
            self._preparing -= 1

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop, self._queue, self._slots = loop, asyncio.Queue(), asyncio.Semaphore(self.runs)
            self._worker = loop.create_task(self._run_batches())

    async def predict(self, source, name: str = "", heatmap: bool | str = True) -> Prediction:
        """Classify one upload; concurrent calls are batched. Never raises on bad input."""
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        self._preparing += 1
        self._arrived()
        try:
            prepared = await loop.run_in_executor(self._prep, self.classifier.prepare, source, name)
            if prepared.x is None:
                return prepared.pred
            fut = loop.create_future()
            self._queue.put_nowait((prepared, fut))
        finally:
            self._preparing -= 1
        probs, cam, score = await fut
        pred = await loop.run_in_executor(self._prep, self.classifier.finish, prepared, probs, cam, score, heatmap)
        pred.elapsed_ms = (time.perf_counter() - t0) * 1000
        self.served += 1
        return pred

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        q = self._queue
        while True:
            await self._slots.acquire()  # a free run first: while every run is busy, the queue grows into bigger batches
            try:
                batch = [await q.get()]
            except BaseException:
                self._slots.release()
                raise
            while len(batch) < self.max_batch and not q.empty():
                batch.append(q.get_nowait())
            if self.max_delay and len(batch) < self.max_batch and self._preparing:
                deadline = loop.time() + self.max_delay
                while len(batch) < self.max_batch and (self._preparing or not q.empty()):
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(q.get(), left))
                    except asyncio.TimeoutError:
                        break
            self.batch_sizes[len(batch)] += 1
            task = loop.create_task(self._run_batch(batch))
            self._running.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(self._running.discard)

    async def _run_batch(self, batch: list) -> None:
        try:
            probs, cams, scores = await asyncio.get_running_loop().run_in_executor(
                self._model, self._run, [p for p, _ in batch])
        except Exception as exc:  # a failed run fails its requests, not the batcher
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        finally:
            self._slots.release()
        for i, (_, fut) in enumerate(batch):
            if not fut.done():  # the request may have been cancelled
                fut.set_result((probs[i], None if cams is None else cams[i], None if scores is None else scores[i]))

    def _run(self, prepared: list):
        t0 = time.perf_counter()
        with self._model_lock:
            self._in_model += 1
            self.peak_runs = max(self.peak_runs, self._in_model)
        try:
            logits, cams, embs = self.classifier.run(np.stack([p.x for p in prepared]))
            return self.classifier.probabilities(logits), cams, self.classifier.gate_scores(prepared, embs)
        finally:
            with self._model_lock:  # two runs may end at once
                self._in_model -= 1
                self.model_s += time.perf_counter() - t0

    def stop(self) -> None:
        """Stop the batch loop (it restarts with the next request)."""
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None

    def close(self) -> None:
        self.stop()
        self._prep.shutdown(wait=False, cancel_futures=True)
        self._model.shutdown(wait=False, cancel_futures=True)
