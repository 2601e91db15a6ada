"""Routing predictions to the in-process model or to connected model servers.

Remote model servers (``python -m uplink_server connect``) hold a websocket to
``/uplink/ws``. Requests go round-robin to connected servers with free
capacity, then to the in-process model; a server that drops mid-request is
taken out of rotation and the request is retried elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import uuid
from dataclasses import dataclass, field

from fastapi import WebSocket

from uplink_server import gradcam
from uplink_server.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_DELAY_MS, DynamicBatcher

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    pass


class ConnectionLost(RuntimeError):
    pass


class Saturated(RuntimeError):
    """Every model is busy: more uploads wait for one than ``max_waiting``, or one waited past ``queue_wait_s``.
    The case stays pending (code ``busy``) and resumes by itself; API clients get 503 with Retry-After."""


@dataclass
class Job:
    """One request to classify a stored case; its id makes the case write idempotent."""

    id: str
    case_id: int
    user_id: int | None = None


@dataclass
class Outcome:
    result: dict  # Prediction.to_dict()
    heatmap_png: bytes | None
    served_by: str
    heatmap_map: tuple | None = None  # (class map, box, image shape): drawn on first view
    written: bool = False  # already in its case: a broker result, written by the node's result writer on arrival

    @classmethod
    def from_reply(cls, reply: dict, served_by: str) -> "Outcome":
        """A model server's reply (uplink message or broker result body): its result and its heatmap, drawn
        (``heatmap_png``) or as the class map (``heatmap_map``, what this web app asks for)."""
        png = base64.b64decode(reply["heatmap_png"]) if reply.get("heatmap_png") else None
        kept = None
        if png is None and reply.get("heatmap_map") is not None:
            try:
                kept = gradcam.map_from_dict(reply["heatmap_map"])
            except ValueError as exc:  # the answer stands without its heatmap
                log.warning("model server %s sent an unreadable class map: %s", served_by, exc)
        return cls(reply.get("result") or {}, png, served_by, kept)


@dataclass
class UplinkConnection:
    ws: WebSocket
    name: str
    model: str
    version: str
    capacity: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    pending: dict = field(default_factory=dict)
    closed: bool = False

    @property
    def busy(self) -> bool:
        return len(self.pending) >= self.capacity

    async def predict(self, data: bytes, filename: str, timeout: float) -> Outcome:
        req_id = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self.pending[req_id] = fut
        try:
            await self.ws.send_json({"type": "predict", "id": req_id, "filename": filename, "heatmap": gradcam.MAP_ONLY,
                                     "data": base64.b64encode(data).decode("ascii")})
            msg = await asyncio.wait_for(fut, timeout)
        except ConnectionLost:
            raise
        except Exception as exc:  # WebSocketDisconnect, timeouts, closed transports: all mean "try elsewhere"
            raise ConnectionLost(f"model server {self.name}: {exc!r}") from exc
        finally:
            self.pending.pop(req_id, None)
        if msg.get("error"):
            raise ConnectionLost(f"model server {self.name} failed: {msg['error']}")
        return Outcome.from_reply(msg, f"uplink:{self.name}")

    def fail_all(self, reason: str) -> None:
        self.closed = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(reason))


class ModelRouter:
    def __init__(self, local=None, timeout: float = 60.0, max_batch: int = DEFAULT_MAX_BATCH,
                 max_delay_ms: float = DEFAULT_MAX_DELAY_MS, max_waiting: int = 48, queue_wait_s: float = 20.0,
                 model_runs: int | None = None):
        self.max_batch, self.max_delay_ms, self.model_runs = max_batch, max_delay_ms, model_runs
        # back-pressure: at most this many uploads wait for a model at once, each at most queue_wait_s; beyond
        # that the upload is kept as a pending case and the client told to come back (never an unbounded queue)
        self.max_waiting, self.queue_wait_s = max_waiting, queue_wait_s
        self.waiting = 0
        self.refused_busy = 0
        self.local = local  # uplink_server.model.Classifier or None; runs behind a DynamicBatcher
        self.uplinks: dict[str, UplinkConnection] = {}
        self.broker = None  # web_app.broker.BrokerClient when --broker is set
        self.timeout = timeout
        self._rr = itertools.count()

    @property
    def local(self):
        return self._local

    @local.setter
    def local(self, classifier) -> None:
        self._local = classifier
        self.batcher = None if classifier is None else DynamicBatcher(classifier, self.max_batch, self.max_delay_ms,
                                                                      runs=self.model_runs)

    def status(self) -> dict:
        return {
            "local": None if self.local is None else {"model": self.local.name, "version": self.local.version,
                                                      "batching": self.batcher.status()},
            "uplinks": [{"id": u.id, "name": u.name, "model": u.model, "version": u.version, "capacity": u.capacity,
                         "in_flight": len(u.pending)} for u in self.uplinks.values()],
        }

    def expecting(self):
        """Around the handling of an upload: the in-process batcher may wait for it."""
        return self.batcher.expecting() if self.batcher is not None else contextlib.nullcontext()

    @property
    def saturated(self) -> bool:
        return self.waiting >= self.max_waiting

    def load(self) -> dict:
        return {"waiting": self.waiting, "max_waiting": self.max_waiting, "saturated": self.saturated,
                "refused_busy": self.refused_busy}

    async def full_status(self) -> dict:
        out = self.status()
        out["load"] = self.load()
        out["broker"] = None if self.broker is None else await self.broker.status()
        return out

    @property
    def available(self) -> bool:
        return self.local is not None or bool(self.uplinks) or (self.broker is not None and bool(self.broker.servers))

    def add(self, conn: UplinkConnection) -> None:
        self.uplinks[conn.id] = conn
        log.info("model server %s connected (%s %s)", conn.name, conn.model, conn.version)

    def remove(self, conn: UplinkConnection, reason: str = "disconnected") -> None:
        self.uplinks.pop(conn.id, None)
        conn.fail_all(reason)
        log.info("model server %s removed: %s", conn.name, reason)

    def _candidates(self) -> tuple[list[UplinkConnection], list[UplinkConnection]]:
        """(connected model servers with free capacity, busy ones), round-robin."""
        ups = [u for u in self.uplinks.values() if not u.closed]
        if not ups:
            return [], []
        start = next(self._rr) % len(ups)
        ordered = ups[start:] + ups[:start]
        return [u for u in ordered if not u.busy], [u for u in ordered if u.busy]

    async def _try_uplinks(self, conns, data: bytes, filename: str) -> Outcome | None:
        for conn in conns:
            try:
                return await conn.predict(data, filename, self.timeout)
            except ConnectionLost as exc:
                log.warning("%s; trying the next model", exc)
                self.remove(conn, str(exc))
        return None

    async def predict(self, data: bytes, filename: str, job: Job | None = None, decoded=None) -> Outcome:
        """Free websocket model servers, then the broker's, then the in-process
        model, then busy websocket servers. Raises ModelUnavailable, Saturated (too many waiting, or waited too
        long for the in-process model), or JobPending when a broker job outlives the timeout (it still completes)."""
        if self.saturated:
            self.refused_busy += 1
            raise Saturated(f"{self.waiting} uploads are waiting for a model")
        self.waiting += 1
        try:
            return await self._predict(data, filename, job, decoded)
        finally:
            self.waiting -= 1

    async def _predict(self, data: bytes, filename: str, job: Job | None, decoded) -> Outcome:
        free, busy = self._candidates()
        if (out := await self._try_uplinks(free, data, filename)) is not None:
            return out
        if self.broker is not None and job is not None and await self.broker.available():
            from .broker import JobPending

            try:
                body = await self.broker.submit(job.id, job.case_id, data, filename, self.timeout,
                                                user_id=job.user_id)
            except JobPending:
                raise
            except Exception as exc:  # the broker dropped: serve another way
                log.warning("broker unavailable (%r); trying the next model", exc)
            else:
                if not body.get("error"):
                    # the node's result writer wrote it, heatmap included, before this wait ended
                    # (web_app.broker._on_result): nothing of it to decode again here
                    return Outcome(body.get("result") or {}, None, f"broker:{body.get('served_by', '')}", written=True)
                log.warning("model server %s failed job %s: %s", body.get("served_by"), job.id, body["error"])
        if self.batcher is not None:
            try:
                # the class map only: the picture is drawn when someone looks at it (most API uploads: never)
                pred = await asyncio.wait_for(self.batcher.predict(data if decoded is None else decoded, filename,
                                                                   heatmap=gradcam.MAP_ONLY), self.queue_wait_s)
            except asyncio.TimeoutError:
                self.refused_busy += 1
                raise Saturated(f"the in-process model did not answer within {self.queue_wait_s:.0f} s") from None
            kept = (pred.heatmap, pred.heatmap_box, pred.heatmap_shape) if pred.heatmap is not None else None
            return Outcome(pred.to_dict(), pred.heatmap_png, "local", kept)
        if (out := await self._try_uplinks(busy, data, filename)) is not None:
            return out
        raise ModelUnavailable("no model is available")


async def serve_uplink(ws: WebSocket, router: ModelRouter, key: str) -> None:
    """The server side of one model server's websocket."""
    from .security import same

    auth = ws.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else ws.query_params.get("key")
    if not same(given, key):
        await ws.close(code=4401, reason="invalid uplink key")
        return
    await ws.accept()
    try:
        hello = await asyncio.wait_for(ws.receive_json(), 10)
    except Exception:
        await ws.close(code=4400, reason="expected hello")
        return
    if hello.get("type") != "hello":
        await ws.close(code=4400, reason="expected hello")
        return
    conn = UplinkConnection(ws, str(hello.get("name", "model-server"))[:64], str(hello.get("model", "")),
                            str(hello.get("version", "")), max(1, min(int(hello.get("capacity", 2)), 64)))
    router.add(conn)
    await ws.send_json({"type": "welcome", "id": conn.id})
    try:
        while True:
            msg = await ws.receive_json()
            kind = msg.get("type")
            if kind == "result":
                fut = conn.pending.get(msg.get("id"))
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif kind == "ping":
                await ws.send_json({"type": "pong"})
    except Exception as exc:  # WebSocketDisconnect and friends
        router.remove(conn, f"connection closed ({type(exc).__name__})")
