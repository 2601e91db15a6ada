"""The model server's side of the uplink to our web app.

Connects *out* (works behind NAT, on Colab or a rented GPU), authenticates
with the key, answers ``predict`` requests with bounded concurrency, sends
heartbeats and reconnects with exponential backoff when the link drops.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import socket
from urllib.parse import urlparse, urlunparse

from . import gradcam
from .batching import DynamicBatcher
from .model import Classifier

log = logging.getLogger(__name__)


class AuthenticationFailed(RuntimeError):
    pass


def ws_url(url: str) -> str:
    p = urlparse(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(p.scheme, "ws")
    path = p.path.rstrip("/")
    if not path.endswith("/uplink/ws"):
        path += "/uplink/ws"
    return urlunparse((scheme, p.netloc, path, "", "", ""))


class UplinkClient:
    def __init__(self, url: str, key: str, classifier: Classifier | DynamicBatcher, max_concurrency: int = 16,
                 name: str | None = None, heartbeat_s: float = 15.0, backoff_max_s: float = 60.0):
        self.url = ws_url(url)
        self.key = key
        # concurrent requests share model runs
        self.batcher = classifier if isinstance(classifier, DynamicBatcher) else DynamicBatcher(classifier, runs=1)
        self.classifier = self.batcher.classifier
        self.max_concurrency = max(1, max_concurrency)
        self.name = name or socket.gethostname()
        self.heartbeat_s = heartbeat_s
        self.backoff_max_s = backoff_max_s
        self.connected = asyncio.Event()
        self.served = 0
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    async def run_forever(self) -> None:
        import websockets

        delay = 1.0
        while not self._stop:
            try:
                await self.run_once()
                delay = 1.0
            except AuthenticationFailed:
                raise
            except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as exc:
                self.connected.clear()
                if self._stop:
                    break
                wait = min(self.backoff_max_s, delay) * (0.5 + random.random())
                log.warning("uplink to %s lost (%s); reconnecting in %.1fs", self.url, exc, wait)
                print(f"uplink: connection to {self.url} failed ({exc}); retrying in {wait:.1f}s", flush=True)
                await asyncio.sleep(wait)
                delay = min(self.backoff_max_s, delay * 2)

    async def run_once(self) -> None:
        import websockets

        try:
            ws = await websockets.connect(self.url, additional_headers={"Authorization": f"Bearer {self.key}"},
                                          max_size=128 * 1024 * 1024, ping_interval=self.heartbeat_s,
                                          ping_timeout=self.heartbeat_s * 2, open_timeout=15)
        except websockets.exceptions.InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                raise AuthenticationFailed("the web app refused the uplink key") from exc
            raise
        sem = asyncio.Semaphore(self.max_concurrency)
        tasks: set[asyncio.Task] = set()
        try:
            await ws.send(json.dumps({"type": "hello", "name": self.name, "model": self.classifier.name,
                                      "version": self.classifier.version, "classes": self.classifier.classes,
                                      "capacity": self.max_concurrency}))
            try:
                welcome = json.loads(await asyncio.wait_for(ws.recv(), 15))
            except websockets.exceptions.ConnectionClosed as exc:
                if exc.rcvd and exc.rcvd.code == 4401:
                    raise AuthenticationFailed("the web app refused the uplink key") from exc
                raise
            print(f"uplink: connected to {self.url} as {self.name} (id {welcome.get('id')}), "
                  f"serving {self.classifier.name} {self.classifier.version}", flush=True)
            self.connected.set()
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("type") == "predict":
                    t = asyncio.create_task(self._handle(ws, sem, msg))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
        finally:
            self.connected.clear()
            for t in tasks:
                t.cancel()
            await ws.close()

    async def _handle(self, ws, sem: asyncio.Semaphore, msg: dict) -> None:
        async with sem:  # bounded: at most max_concurrency predictions at once
            try:
                data = base64.b64decode(msg["data"])
                pred = await self.batcher.predict(data, msg.get("filename", ""),
                                                  heatmap=gradcam.requested(msg.get("heatmap")))
                reply = {"type": "result", "id": msg["id"], "result": pred.to_dict(), **pred.heatmap_fields()}
            except Exception as exc:  # report, never crash the link
                log.exception("prediction failed")
                reply = {"type": "result", "id": msg.get("id"), "error": f"{type(exc).__name__}: {exc}"}
            self.served += 1
            await ws.send(json.dumps(reply))
