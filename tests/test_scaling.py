"""Dynamic batching, and model servers behind a real RabbitMQ broker.

The broker tests need RabbitMQ on 127.0.0.1:5672 (guest/guest; `.ci/run` starts
it where it is installed and stopped) and skip without one. Each test uses its
own queue names, removed at the end.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from .conftest import REPO
from .webapp_helpers import _run_client_in_thread, live_app, new_token, sign_in
from .webapp_helpers import wait_until as _wait

BROKER = os.environ.get("CXR_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672/")


# --- batching ------------------------------------------------------------------------

def test_concurrent_requests_share_batches_and_keep_their_results(classifier, xray_paths):
    from uplink_server.batching import DynamicBatcher

    files = [p for k in ("kermany_normal", "kermany_pneumonia", "covid", "adult_normal") for p in xray_paths[k]]
    expected = [classifier.predict(p) for p in files]  # one by one, no batching
    assert len({round(e.probabilities["normal"], 6) for e in expected}) > 8  # distinct, so a mix-up would show
    batcher = DynamicBatcher(classifier, max_batch=8, max_delay_ms=20)

    async def burst():
        return await asyncio.gather(*(batcher.predict(p.read_bytes(), p.name) for p in files))

    got = asyncio.run(burst())
    sizes = batcher.batch_sizes
    assert sum(k * v for k, v in sizes.items()) == len(files)
    assert max(sizes) > 1 and max(sizes) <= 8  # grouped, never above the limit
    assert sum(sizes.values()) < len(files)
    for e, g in zip(expected, got):
        assert g.file == Path(e.file).name and g.label == e.label
        for c in classifier.classes:
            assert abs(g.probabilities[c] - e.probabilities[c]) < 1e-5
        assert g.heatmap_png and g.heatmap.shape == e.heatmap.shape and np.abs(g.heatmap - e.heatmap).max() < 1e-4


def test_two_batches_in_the_model_at_once_keep_every_result_and_the_limits(classifier, xray_paths):
    """With two runs, a burst is served by batches that overlap in the model (never more than two), each
    request still gets its own image's answer, and a model held to one core runs one batch at a time."""
    from uplink_server.batching import DynamicBatcher
    from uplink_server.model import Classifier

    files = [p for k in ("kermany_normal", "kermany_pneumonia", "covid", "adult_normal") for p in xray_paths[k]] * 3
    expected = {p.name: classifier.predict(p, heatmap=False) for p in files}
    batcher = DynamicBatcher(classifier, max_batch=2, max_delay_ms=0, runs=2)

    async def burst():
        return await asyncio.gather(*(batcher.predict(p.read_bytes(), p.name, heatmap=False) for p in files))

    got = asyncio.run(burst())
    assert batcher.status()["concurrent_runs"] == 2 and 1 <= batcher.peak_runs <= 2
    assert max(batcher.batch_sizes) <= 2 and batcher.served == len(files)
    for p, g in zip(files, got):
        assert g.file == p.name and g.label == expected[p.name].label
        assert abs(g.probabilities["normal"] - expected[p.name].probabilities["normal"]) < 1e-5
    # two runs overlapped at some point of a burst of 48 requests in batches of at most 2
    assert batcher.peak_runs == 2
    one_core = DynamicBatcher(Classifier(classifier.path, threads=1))
    assert one_core.runs == 1 and DynamicBatcher(classifier).runs == 2
    with pytest.raises(ValueError):
        DynamicBatcher(classifier, runs=0)


def test_one_request_on_an_idle_server_runs_alone_and_bad_input_is_refused(classifier, one_xray):
    from uplink_server.batching import DynamicBatcher

    batcher = DynamicBatcher(classifier, max_batch=16, max_delay_ms=1000)  # a long window, never used when idle

    async def one():
        t0 = time.perf_counter()
        pred = await batcher.predict(one_xray.read_bytes())
        return pred, time.perf_counter() - t0

    pred, took = asyncio.run(one())
    assert pred.label and dict(batcher.batch_sizes) == {1: 1}
    assert took < 0.9  # did not sit out the 1 s window
    bad = asyncio.run(batcher.predict(b"not an image"))
    assert bad.refused and bad.refusal["code"] == "not_an_image" and dict(batcher.batch_sizes) == {1: 1}
    with pytest.raises(ValueError):
        DynamicBatcher(classifier, max_batch=0)


def test_web_app_batches_its_in_process_model(tmp_path, classifier, xray_paths):
    files = [p for k in ("kermany_normal", "covid", "adult_normal") for p in xray_paths[k]]
    with live_app(tmp_path / "d", classifier=classifier, batch_delay_ms=20) as (app, base):
        c, csrf = sign_in(base)
        h = {"Authorization": f"Bearer {new_token(c, csrf)}"}

        async def burst(n):
            async with httpx.AsyncClient(base_url=base, headers=h, timeout=60) as cl:
                return await asyncio.gather(*(cl.post("/api/v1/predict", files={"file": (p.name, p.read_bytes())},
                                                      data={"patient_code": f"B{n}-{i}"}) for i, p in enumerate(files)))

        # On a loaded machine uploads can arrive further apart than a model run, and then each rightly runs
        # alone: up to three bursts, and at least one must be batched.
        for burst_no in range(1, 4):
            rs = asyncio.run(burst(burst_no))
            assert all(r.status_code == 200 for r in rs)
            assert [r.json()["patient_code"] for r in rs] == [f"B{burst_no}-{i}" for i in range(len(files))]
            st = httpx.get(f"{base}/api/v1/status", headers=h).json()["local"]["batching"]
            assert st["served"] == burst_no * len(files)
            if st["batches"] < st["served"]:
                break
        assert st["batches"] < st["served"] and st["mean_batch"] > 1
        assert "mean batch" in c.get("/admin").text


# --- the broker ----------------------------------------------------------------------

def _broker_up() -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
        return True
    except OSError:
        return False


needs_broker = pytest.mark.skipif(not _broker_up(), reason="RabbitMQ not reachable on 127.0.0.1:5672")


@pytest.fixture()
def prefix():
    p = f"cxr-test-{uuid.uuid4().hex[:8]}"
    yield p

    async def cleanup():
        import aio_pika

        conn = await aio_pika.connect(BROKER)
        ch = await conn.channel()
        for q in (f"{p}.jobs", f"{p}.results.n1", f"{p}.results.n2"):
            await ch.queue_delete(q)
        await ch.exchange_delete(f"{p}.servers")
        await conn.close()

    if _broker_up():
        asyncio.run(cleanup())


class WorkerThread:
    """A real model server taking jobs from the broker, in a thread of its own."""

    def __init__(self, classifier, prefix: str, name: str = "gpu-1"):
        from uplink_server.batching import DynamicBatcher
        from uplink_server.broker import BrokerWorker

        self.worker = BrokerWorker(BROKER, DynamicBatcher(classifier, max_delay_ms=2), name=name, prefix=prefix,
                                   heartbeat_s=0.5)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=lambda: self.loop.run_until_complete(self.worker.run()), daemon=True)
        self.thread.start()
        assert _wait(self.worker.connected.is_set)

    def stop(self):
        self.loop.call_soon_threadsafe(self.worker.stop)
        self.thread.join(10)


ROGUE = """
import asyncio, sys, aio_pika
async def main():
    conn = await aio_pika.connect(sys.argv[1])
    ch = await conn.channel()
    await ch.set_qos(prefetch_count=1)
    q = await ch.declare_queue(sys.argv[2] + ".jobs", durable=True)
    async def got(message):  # takes the job and never answers, like a server that dies mid-job
        print("got", message.correlation_id, flush=True)
    await q.consume(got)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def _rogue(prefix: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", ROGUE, BROKER, prefix], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout.readline().strip() == "ready"
    return p


def _broker_app(tmp_path, prefix, node="n1", **over):
    return live_app(tmp_path, classifier=None, broker_url=BROKER, broker_prefix=prefix, node_name=node, **over)


def _connected(app, base):
    """Wait for the web node's broker link; (signed-in admin client, API token header)."""
    assert _wait(lambda: app.state.router.broker is not None)
    c, csrf = sign_in(base)
    return c, {"Authorization": f"Bearer {new_token(c, csrf)}"}


def _classify_entries(app, case_id) -> int:
    from web_app.db import AuditLog

    with app.state.SessionLocal() as db:
        return db.query(AuditLog).filter(AuditLog.action == "classify", AuditLog.case_id == case_id).count()


def _heatmap_is_a_kept_map_drawn_on_view(app, c, case_id, classifier):
    """A model server asked for the class map only: the case keeps the map, and its first view draws the picture
    the model itself would have drawn from the stored file."""
    from PIL import Image

    from web_app.db import Case

    with app.state.SessionLocal() as db:
        case = db.get(Case, case_id)
        kept, stored = case.heatmap_path, app.state.settings.upload_dir / case.image_path
    assert kept and kept.endswith(".heatmap.json")
    r = c.get(f"/cases/{case_id}/heatmap.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    direct = classifier.predict(stored.read_bytes())
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(Image.open(io.BytesIO(direct.heatmap_png))))


@needs_broker
def test_jobs_round_trip_and_a_repeated_job_is_written_once(tmp_path, classifier, one_xray, prefix):
    with _broker_app(tmp_path / "d", prefix) as (app, base):
        c, h = _connected(app, base)
        worker = WorkerThread(classifier, prefix)
        try:
            units = app.state.db_writer.units
            r = httpx.post(f"{base}/api/v1/predict", headers=h, files={"file": ("a.jpeg", one_xray.read_bytes())}, timeout=60)
            assert r.status_code == 200 and r.json()["served_by"] == "broker:gpu-1" and r.json()["label"]
            case_id = r.json()["case_id"]
            # the case and its answer: written once each (the answer by the node's result writer, not again by the reply)
            assert app.state.db_writer.units == units + 2
            assert _classify_entries(app, case_id) == 1
            _heatmap_is_a_kept_map_drawn_on_view(app, c, case_id, classifier)
            # the broker delivers the same job again (as after a lost acknowledgement): answered, not rewritten
            from web_app.db import AuditLog

            with app.state.SessionLocal() as db:
                job = db.query(AuditLog).filter(AuditLog.action == "classify").one().detail["job"]
            served = worker.worker.served
            asyncio.run(_publish_job(prefix, job, case_id, app))
            assert _wait(lambda: worker.worker.served == served + 1)
            time.sleep(0.5)
            assert _classify_entries(app, case_id) == 1
            st = httpx.get(f"{base}/api/v1/status", headers=h).json()["broker"]
            assert st["consumers"] == 1 and st["queue_depth"] == 0 and st["node"] == "n1"
            assert _wait(lambda: any(s["name"] == "gpu-1" and s["health"] == "ok"
                                     for s in httpx.get(f"{base}/api/v1/status", headers=h).json()["broker"]["servers"]))
            assert "gpu-1" in c.get("/admin").text and "jobs waiting" in c.get("/admin").text
        finally:
            worker.stop()
        # the server is gone: the Admin page and the status say so, and nothing routes to it
        assert _wait(lambda: httpx.get(f"{base}/api/v1/status", headers=h).json()["broker"]["consumers"] == 0)
        r = httpx.post(f"{base}/api/v1/predict", headers=h, files={"file": ("a.jpeg", one_xray.read_bytes())}, timeout=60)
        assert r.status_code == 503 and r.json()["status"] == "pending"  # kept, clear, not a 500


async def _publish_job(prefix, job_id, case_id, app):
    import aio_pika

    from web_app.db import Case

    with app.state.SessionLocal() as db:
        path = app.state.settings.upload_dir / db.get(Case, case_id).image_path
    conn = await aio_pika.connect(BROKER)
    ch = await conn.channel()
    await ch.default_exchange.publish(aio_pika.Message(path.read_bytes(), correlation_id=job_id,
                                                       reply_to=f"{prefix}.results.n1",
                                                       headers={"case_id": case_id, "filename": "x", "user_id": 1}),
                                      routing_key=f"{prefix}.jobs")
    await conn.close()


@needs_broker
def test_a_model_server_killed_mid_job_has_its_job_redelivered(tmp_path, classifier, one_xray, prefix):
    with _broker_app(tmp_path / "d", prefix) as (app, base):
        c, h = _connected(app, base)
        rogue = _rogue(prefix)
        out = {}
        th = threading.Thread(target=lambda: out.update(r=httpx.post(
            f"{base}/api/v1/predict", headers=h, files={"file": ("a.jpeg", one_xray.read_bytes())}, timeout=60)))
        time.sleep(0.6)  # the web node's view of the consumers is refreshed twice a second
        th.start()
        assert rogue.stdout.readline().startswith("got ")  # the rogue holds the job
        worker = WorkerThread(classifier, prefix, name="survivor")
        try:
            rogue.send_signal(signal.SIGKILL)
            rogue.wait(10)
            th.join(60)
            r = out["r"]
            assert r.status_code == 200 and r.json()["served_by"] == "broker:survivor"
            assert _classify_entries(app, r.json()["case_id"]) == 1
        finally:
            worker.stop()
            rogue.kill()


@needs_broker
def test_a_job_survives_a_restart_of_its_web_node(tmp_path, classifier, one_xray, prefix):
    data = tmp_path / "d"
    rogue = _rogue(prefix)
    try:
        with _broker_app(data, prefix, uplink_timeout_s=1.5) as (app, base):
            assert _wait(lambda: app.state.router.broker is not None)
            c, csrf = sign_in(base)
            tok = new_token(c, csrf)
            time.sleep(0.6)
            r = httpx.post(f"{base}/api/v1/predict", headers={"Authorization": f"Bearer {tok}"},
                           files={"file": ("a.jpeg", one_xray.read_bytes())}, timeout=60)
            assert r.status_code == 202 and r.json()["status"] == "pending" and r.json()["refusal"]["code"] == "queued"
            case_id = r.json()["case_id"]
        # the web node is down; the model server holding the job dies; another takes it over
        rogue.send_signal(signal.SIGKILL)
        rogue.wait(10)
        worker = WorkerThread(classifier, prefix, name="later")
        try:
            assert _wait(lambda: worker.worker.served == 1)
        finally:
            worker.stop()
        with _broker_app(data, prefix) as (app, base):  # the same node comes back and writes the waiting result
            h = {"Authorization": f"Bearer {tok}"}
            assert _wait(lambda: httpx.get(f"{base}/api/v1/cases/{case_id}", headers=h).json()["status"] == "done")
            body = httpx.get(f"{base}/api/v1/cases/{case_id}", headers=h).json()
            assert body["served_by"] == "broker:later" and body["label"]
            assert _classify_entries(app, case_id) == 1
    finally:
        rogue.kill()


@needs_broker
def test_websocket_uplinks_keep_working_beside_the_broker(tmp_path, classifier, one_xray, prefix):
    from uplink_server.uplink import UplinkClient

    with _broker_app(tmp_path / "d", prefix) as (app, base):
        client = UplinkClient(base, app.state.settings.uplink_key, classifier, name="behind-nat")
        _run_client_in_thread(client)
        assert _wait(lambda: app.state.router.uplinks)
        c, csrf = sign_in(base)
        r = httpx.post(f"{base}/api/v1/predict", headers={"Authorization": f"Bearer {new_token(c, csrf)}"},
                       files={"file": ("a.jpeg", one_xray.read_bytes())}, timeout=60)
        assert r.status_code == 200 and r.json()["served_by"] == "uplink:behind-nat"
        _heatmap_is_a_kept_map_drawn_on_view(app, c, r.json()["case_id"], classifier)
        client.stop()
