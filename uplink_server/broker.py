"""Model servers behind a message broker (RabbitMQ, through aio-pika).

For many web nodes and many model servers: web nodes put jobs on one durable
queue and any model server takes them; each result goes to the durable result
queue of the web node that asked (its ``reply_to``), so it survives that node's
restart. RabbitMQ gives the guarantees this needs: a job is acknowledged only
after its result is published (a server killed mid-job has its jobs delivered
again to another), and ``prefetch`` bounds how many jobs a server holds, so a
slow server takes less and a gone one takes none. A server that stalls on a job
hands it back (``--stall-s``) and stops taking work until it recovers.

Jobs may therefore be answered twice; the web app writes a case once per job id.

Messages: a job's body is the (de-identified) image, with ``correlation_id`` =
job id and the headers ``case_id`` and ``filename``; a result's body is JSON
``{"result": Prediction.to_dict(), "heatmap_png": base64|None, "error": str|None,
"served_by": name}``; a job with the header ``heatmap: "map"`` gets ``heatmap_map`` (the class map,
``gradcam.map_to_dict``) instead of the drawn picture. Servers announce themselves every ``heartbeat_s`` on the
fanout exchange ``<prefix>.servers``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

from . import gradcam
from .batching import DynamicBatcher

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "cxr"
HEARTBEAT_S = 2.0


def jobs_queue(prefix: str) -> str:
    return f"{prefix}.jobs"


def results_queue(prefix: str, node: str) -> str:
    return f"{prefix}.results.{node}"


def servers_exchange(prefix: str) -> str:
    return f"{prefix}.servers"


def redact(url: str) -> str:
    """The broker URL without its password, for pages and logs."""
    from urllib.parse import urlparse

    p = urlparse(url)
    if p.password:
        return url.replace(f":{p.password}@", ":***@")
    return url


async def declare_jobs(channel, prefix: str):
    return await channel.declare_queue(jobs_queue(prefix), durable=True)


class BrokerWorker:
    """A model server taking jobs from the broker."""

    def __init__(self, url: str, batcher: DynamicBatcher, name: str | None = None, prefetch: int | None = None,
                 prefix: str = DEFAULT_PREFIX, heartbeat_s: float = HEARTBEAT_S, stall_s: float = 60.0):
        self.url, self.batcher, self.prefix = url, batcher, prefix
        self.name = name or socket.gethostname()
        self.prefetch = prefetch or batcher.max_batch * 2  # enough queued to fill the next batch
        self.heartbeat_s, self.stall_s = heartbeat_s, stall_s
        self.in_flight: dict[str, tuple[float, object]] = {}  # job id -> (start, message)
        self.served = 0
        self.redelivered = 0  # jobs another server had taken and not finished
        self.paused = False
        self.stalled: set[str] = set()  # handed back, still running here
        self.connected = asyncio.Event()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        import aio_pika

        conn = await aio_pika.connect_robust(self.url, client_properties={"connection_name": f"model-server {self.name}"})
        try:
            channel = await conn.channel()
            await channel.set_qos(prefetch_count=self.prefetch)
            queue = await declare_jobs(channel, self.prefix)
            servers = await channel.declare_exchange(servers_exchange(self.prefix), aio_pika.ExchangeType.FANOUT)
            self._channel, self._queue = channel, queue
            self._tag = await queue.consume(self._on_job)
            self.connected.set()
            print(f"broker: {self.name} taking jobs from {jobs_queue(self.prefix)} at {redact(self.url)} "
                  f"(prefetch {self.prefetch}, batches up to {self.batcher.max_batch})", flush=True)
            while not self._stop.is_set():
                await self._watch(queue)
                await servers.publish(aio_pika.Message(json.dumps(self.status()).encode(), expiration=10), routing_key="")
                try:
                    await asyncio.wait_for(self._stop.wait(), self.heartbeat_s)
                except asyncio.TimeoutError:
                    pass
            await servers.publish(aio_pika.Message(json.dumps({**self.status(), "leaving": True}).encode()), routing_key="")
        finally:
            self.connected.clear()
            self.batcher.stop()
            await conn.close()

    def status(self) -> dict:
        oldest = min((t for t, _ in self.in_flight.values()), default=None)
        return {"name": self.name, "model": self.batcher.name, "version": self.batcher.version, "at": time.time(),
                "served": self.served, "redelivered": self.redelivered, "in_flight": len(self.in_flight), "paused": self.paused,
                "oldest_job_s": None if oldest is None else round(time.monotonic() - oldest, 1),
                "batching": self.batcher.status()}

    async def _watch(self, queue) -> None:
        """Hand back jobs stuck longer than stall_s and stop taking new ones until clear."""
        now = time.monotonic()
        stuck = [(jid, msg) for jid, (t, msg) in self.in_flight.items() if now - t > self.stall_s]
        for jid, msg in stuck:
            self.in_flight.pop(jid, None)
            self.stalled.add(jid)
            log.warning("job %s stalled for over %.0f s: handing it back", jid, self.stall_s)
            await msg.nack(requeue=True)
        if stuck and not self.paused:
            self.paused = True
            await queue.cancel(self._tag)
        elif self.paused and not self.stalled:  # the stuck work finished: take jobs again
            self.paused = False
            self._tag = await queue.consume(self._on_job)

    async def _on_job(self, message) -> None:
        import aio_pika

        job_id = message.correlation_id or ""
        self.in_flight[job_id] = (time.monotonic(), message)
        self.redelivered += bool(message.redelivered)
        try:
            headers = message.headers or {}
            # a web node that draws heatmaps on first view asks for the class map: no overlay, no PNG here
            pred = await self.batcher.predict(message.body, str(headers.get("filename", "")),
                                              heatmap=gradcam.requested(headers.get("heatmap")))
            body = {"result": pred.to_dict(), "served_by": self.name, **pred.heatmap_fields()}
        except Exception as exc:  # report it; the web app decides what to do
            log.exception("job %s failed", job_id)
            body = {"error": f"{type(exc).__name__}: {exc}", "served_by": self.name}
        if self.in_flight.pop(job_id, None) is None:
            self.stalled.discard(job_id)
            return  # handed back as stalled: another server answers it
        if message.reply_to:
            await self._channel.default_exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), correlation_id=job_id, content_type="application/json",
                                 headers=dict(message.headers or {}),  # case_id, user_id: back to the web node
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=message.reply_to)
        await message.ack()  # only now: a server killed before this point has the job delivered again
        self.served += 1
