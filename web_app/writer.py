"""One thread commits the upload path's rows, several uploads per transaction (group commit).

SQLite has one writer at a time. With every upload's thread writing for itself, the write lock was held 21-23 ms
per answer for about 8 ms of work (the holder waits for the GIL and a core among twenty busy threads) and an upload
waited about 200 ms for it at 35 answers a second (BENCHMARKS.md, issue 25). Here the case rows of uploads that
arrive together, and the answers of one model batch, are written by one thread in one transaction: the lock is
taken once per batch and never handed between threads.

A unit of work is a function of a session that adds or changes rows and returns what its caller needs; it must do
nothing outside the database that a rollback could not undo (files are written before, or removed after). When a
batch fails, each of its units is tried again alone, so only the one at fault sees the error.
"""

from __future__ import annotations

import queue
import threading
import weakref
from concurrent.futures import Future
from typing import Callable, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from uplink_server.stages import CLOCK, stage

T = TypeVar("T")
MAX_BATCH = 32  # units per transaction: a burst's worth; more only lengthens the first caller's wait
WRITER_STAGE = "database writer"  # one entry per transaction
UNITS_STAGE = "database writer units"  # counts units, no time: bench_load reports units per transaction from both

_STOP = object()
_writers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # engine -> its GroupWriter


class GroupWriter:
    def __init__(self, engine, max_batch: int = MAX_BATCH):
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="db-writer", daemon=True)
        self.batches = self.units = 0
        self._stopped = False
        self._lock = threading.Lock()  # a unit is queued before the stop mark or refused, never after it

    def start(self) -> "GroupWriter":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish what is queued, then end the thread; later units are refused."""
        with self._lock:
            self._stopped = True
            self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, unit: Callable[[Session], T]) -> "Future[T]":
        """Queue a unit (before ``start`` too: it waits for the thread)."""
        fut: Future = Future()
        with self._lock:
            if not self._stopped:
                self._queue.put((unit, fut))
                return fut
        fut.set_exception(RuntimeError("the database writer is stopped"))
        return fut

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = [first], False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._write(batch)
            if stop:
                return

    def _write(self, batch: list) -> None:
        self.batches += 1
        self.units += len(batch)
        CLOCK.add(UNITS_STAGE, 0.0, 0.0, len(batch))
        with self._sessions() as db:
            try:
                with stage(WRITER_STAGE):
                    results = [unit(db) for unit, _ in batch]
                    db.commit()
            except Exception:
                db.rollback()
                for unit, fut in batch:  # alone, so that only the faulty unit's caller sees its error
                    try:
                        result = unit(db)
                        db.commit()
                    except Exception as exc:
                        db.rollback()
                        fut.set_exception(exc)
                    else:
                        fut.set_result(result)
                return
        for (_, fut), result in zip(batch, results):
            fut.set_result(result)


def register(engine, writer: GroupWriter | None) -> None:
    """The writer that ``write`` uses for sessions of ``engine`` (None: write in the caller's session)."""
    if writer is None:
        _writers.pop(engine, None)
    else:
        _writers[engine] = writer


def write(db: Session, unit: Callable[[Session], T]) -> T:
    """Run ``unit`` and commit it: on the engine's group writer when the web app runs one (blocking this worker
    thread until its batch is committed), else in ``db`` itself (the command line, scripts). Objects that ``unit``
    returns from the writer's session are detached; ``db.merge(obj, load=False)`` adopts them without a query."""
    writer = _writers.get(db.get_bind())
    if db.in_transaction():
        # the caller's own transaction ends first: were it to hold SQLite's write lock, the writer would wait for it
        # while the caller waits for the writer; and its connection goes back to the pool meanwhile
        db.commit()
    if writer is None:
        result = unit(db)
        db.commit()
        return result
    return writer.submit(unit).result()
