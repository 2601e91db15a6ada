"""A web node's side of the broker: submit jobs, take results, watch servers.

See :mod:`uplink_server.broker` for the design. Results are written to the
database here, as they arrive, by :func:`web_app.cases.apply_outcome` (once per
job id), and only then handed to the request waiting for them, if any: a result
that comes back after a timeout or a restart of this node still lands in its case.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from uplink_server import gradcam
from uplink_server.broker import (
    DEFAULT_PREFIX,
    HEARTBEAT_S,
    declare_jobs,
    redact,
    results_queue,
    servers_exchange,
)

log = logging.getLogger(__name__)


class JobPending(RuntimeError):
    """The job is queued or running but its result did not come back in time."""


class BrokerClient:
    def __init__(self, url: str, node: str, on_result, prefix: str = DEFAULT_PREFIX, depth_cache_s: float = 0.5):
        self.url, self.node, self.prefix = url, node, prefix
        self.on_result = on_result  # (job_id, body, headers) -> None: writes the case
        self.waiting: dict[str, asyncio.Future] = {}
        self.servers: dict[str, dict] = {}
        self._depth = (0.0, 0, 0)  # (when, messages, consumers)
        self._depth_cache_s = depth_cache_s
        self._conn = None
        self.error: str | None = None

    @property
    def status_url(self) -> str:
        return redact(self.url)

    async def start(self) -> None:
        import aio_pika

        self._conn = await aio_pika.connect_robust(self.url, client_properties={"connection_name": f"web node {self.node}"})
        self._channel = await self._conn.channel()
        self._jobs = await declare_jobs(self._channel, self.prefix)
        self._results = await self._channel.declare_queue(results_queue(self.prefix, self.node), durable=True)
        await self._results.consume(self._on_result)
        exchange = await self._channel.declare_exchange(servers_exchange(self.prefix), aio_pika.ExchangeType.FANOUT)
        beats = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        await beats.bind(exchange)
        await beats.consume(self._on_heartbeat, no_ack=True)
        log.info("broker %s: node %s", redact(self.url), self.node)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    # --- jobs -------------------------------------------------------------------------
    async def depth(self) -> tuple[int, int]:
        """(jobs waiting, model servers consuming), from the broker itself (cached briefly)."""
        when, messages, consumers = self._depth
        if time.monotonic() - when > self._depth_cache_s:
            try:
                # the robust channel answers a re-declaration from its cache: ask the broker itself
                ok = await (await self._channel.get_underlay_channel()).queue_declare(self._jobs.name, passive=True)
                messages, consumers = ok.message_count, ok.consumer_count
                self.error = None
            except Exception as exc:  # broker unreachable: say so, route elsewhere
                self.error, messages, consumers = f"{type(exc).__name__}: {exc}", 0, 0
            self._depth = (time.monotonic(), messages, consumers)
        return messages, consumers

    async def available(self) -> bool:
        return (await self.depth())[1] > 0

    async def submit(self, job_id: str, case_id: int, data: bytes, filename: str, timeout: float,
                     user_id: int | None = None) -> dict:
        """Queue a job and wait for its result body (already written to the case)."""
        import aio_pika

        fut = asyncio.get_running_loop().create_future()
        self.waiting[job_id] = fut
        try:
            await self._channel.default_exchange.publish(
                aio_pika.Message(data, correlation_id=job_id, reply_to=self._results.name,
                                 headers={"case_id": case_id, "filename": filename, "user_id": user_id or 0,
                                          "heatmap": gradcam.MAP_ONLY},  # drawn here when someone looks
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=self._jobs.name)
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError as exc:
            raise JobPending(f"job {job_id} is still queued or running") from exc
        finally:
            self.waiting.pop(job_id, None)

    async def _on_result(self, message) -> None:
        job_id = message.correlation_id or ""
        try:
            body = json.loads(message.body)
        except ValueError:
            log.error("unreadable result for job %s dropped", job_id)
            await message.ack()
            return
        try:
            # runs the database write off the event loop; idempotent by job id
            await asyncio.get_running_loop().run_in_executor(None, self.on_result, job_id, body, dict(message.headers or {}))
        except Exception:
            log.exception("result of job %s not written; it stays on the queue", job_id)
            await message.nack(requeue=True)
            await asyncio.sleep(1)
            return
        await message.ack()
        fut = self.waiting.get(job_id)
        if fut is not None and not fut.done():
            fut.set_result(body)

    # --- model servers ----------------------------------------------------------------
    async def _on_heartbeat(self, message) -> None:
        try:
            beat = json.loads(message.body)
        except ValueError:
            return
        if beat.get("leaving"):
            self.servers.pop(beat.get("name"), None)
        else:
            self.servers[str(beat.get("name"))] = {**beat, "seen": time.monotonic()}

    async def status(self) -> dict:
        messages, consumers = await self.depth()
        now = time.monotonic()
        servers = []
        for name, b in sorted(self.servers.items()):
            age = now - b["seen"]
            if age > 30 * HEARTBEAT_S:
                continue  # long gone
            health = "gone" if age > 3 * HEARTBEAT_S else ("slow" if b.get("paused") else "ok")
            servers.append({"name": name, "model": b.get("model"), "version": b.get("version"), "health": health,
                            "last_seen_s": round(age, 1), "served": b.get("served"), "redelivered": b.get("redelivered"),
                            "in_flight": b.get("in_flight"),
                            "mean_batch": (b.get("batching") or {}).get("mean_batch")})
        return {"url": redact(self.url), "node": self.node, "queue_depth": messages, "consumers": consumers,
                "waiting_here": len(self.waiting), "servers": servers, "error": self.error}

