"""Load on the whole web app, as clinics would put it: N clients uploading real X-rays.

    python -m benchmarks.bench_load [--clients 20] [--seconds 60] [--scenarios local,broker2,nodes2,kill]

Each scenario starts real processes on loopback: web app(s) (``python -m web_app
serve``) and model servers (``python -m uplink_server connect --broker``), then
N concurrent clients post real images from ../shared/data to ``/api/v1/predict``
for the given time, and it prints requests/s, p50/p95/p99 latency and errors.

- local:   one web process with its in-process model (dynamic batching)
- broker1: one web process (--no-local-model) + 1 model server over RabbitMQ
- broker2: one web process (--no-local-model) + 2 model servers over RabbitMQ
- nodes2:  2 web nodes (on PostgreSQL when it runs on 127.0.0.1:5432) + 2 model servers
- kill:    like broker2, one model server killed with SIGKILL a third of the way in;
           then counts lost cases (never written), duplicated ones (written twice) and 5xx

Model servers run single-threaded (--threads 1) so that "one" and "two" use one and
two of the machine's cores; ``--server-threads 2`` gives a single model server both. Needs RabbitMQ on 127.0.0.1:5672 for all but ``local``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CXR_DATA_ROOT", REPO.parent / "shared" / "data"))
BROKER = os.environ.get("CXR_BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672/")
PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PASSWORD = "bench-pass-123"


def real_images(n: int = 40) -> list[bytes]:
    out = []
    for name in ("kermany", "covid", "radiography"):
        with open(DATA / name / "labels.csv") as fh:
            rows = list(csv.DictReader(fh))[::211][: n // 3 + 1]
        out += [(DATA / name / r["path"]).read_bytes() for r in rows]
    return out[:n]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


class Stack:
    """Web nodes and model servers as child processes."""

    def __init__(self, nodes: int, servers: int, local: bool, database_url: str | None = None, model: str | None = None,
                 server_threads: int = 1):
        self.dir = Path(tempfile.mkdtemp(prefix="bench-load-"))
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.procs: list[subprocess.Popen] = []
        self.servers: list[subprocess.Popen] = []
        self.bases: list[str] = []
        env = {**os.environ, "PYTHONPATH": str(REPO), "CXR_ADMIN_PASSWORD": PASSWORD, "PYTHONUNBUFFERED": "1"}
        if database_url:
            env["CXR_DATABASE_URL"] = database_url
        if servers:
            env.update(CXR_BROKER_URL=BROKER, CXR_BROKER_PREFIX=self.prefix)
        for i in range(nodes):
            port = free_port()
            cmd = [sys.executable, "-m", "web_app", "serve", "--port", str(port), "--data-dir", str(self.dir)]
            if not local:
                cmd.append("--no-local-model")
            if model:
                cmd += ["--model", model]
            self.procs.append(subprocess.Popen(cmd, env={**env, "CXR_NODE": f"node{i + 1}"}, cwd=REPO,
                                               stdout=open(self.dir / f"node{i + 1}.log", "w"), stderr=subprocess.STDOUT))
            self.bases.append(f"http://127.0.0.1:{port}")
            self._wait_http(self.bases[-1])
        for i in range(servers):
            self.servers.append(subprocess.Popen(
                [sys.executable, "-m", "uplink_server", "connect", "--broker", BROKER, "--broker-prefix", self.prefix,
                 "--name", f"ms{i + 1}", "--threads", str(server_threads)] + (["--model", model] if model else []), env=env, cwd=REPO,
                stdout=open(self.dir / f"ms{i + 1}.log", "w"), stderr=subprocess.STDOUT))
        self.procs += self.servers
        self.token = self._token(self.bases[0])
        if servers:
            self._wait_consumers(servers)

    def _wait_http(self, base: str) -> None:
        for _ in range(600):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"web app at {base} did not start; see {self.dir}")

    def _token(self, base: str) -> str:
        c = httpx.Client(base_url=base, follow_redirects=True, timeout=30)
        csrf = lambda html: re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)  # noqa: E731
        r = c.post("/login", data={"email": "admin@localhost", "password": PASSWORD, "csrf_token": csrf(c.get("/login").text)})
        r = c.post("/tokens", data={"csrf_token": csrf(r.text), "name": "bench", "days": "7"})
        return re.search(r'data-testid="new-token">([^<]+)<', r.text).group(1)

    def status(self) -> dict:
        return httpx.get(self.bases[0] + "/api/v1/status", headers={"Authorization": f"Bearer {self.token}"}, timeout=10).json()

    def stages(self) -> dict:
        """The first web node's time per serving stage so far (``uplink_server.stages``)."""
        return httpx.get(self.bases[0] + "/api/v1/stages", headers={"Authorization": f"Bearer {self.token}"}, timeout=10).json()

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system, every thread) of the first web node so far; None off Linux."""
        try:
            fields = Path(f"/proc/{self.procs[0].pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _wait_consumers(self, n: int) -> None:
        for _ in range(600):
            if (self.status().get("broker") or {}).get("consumers", 0) >= n:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{n} model servers did not connect; see {self.dir}")

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


async def load(bases: list[str], token: str, images: list[bytes], clients: int, seconds: float, on_tick=None):
    """N clients posting in a loop; returns (latencies s, status counts, case ids with status 200)."""
    lat, codes, ok_cases, t_end = [], Counter(), [], time.monotonic() + seconds

    async def client(i: int):
        async with httpx.AsyncClient(base_url=bases[i % len(bases)], timeout=60,
                                     headers={"Authorization": f"Bearer {token}"}) as c:
            k = i
            while time.monotonic() < t_end:
                img = images[k % len(images)]
                k += clients
                t0 = time.perf_counter()
                try:
                    r = await c.post("/api/v1/predict", files={"file": ("x.jpg", img)}, data={"patient_code": f"L-{i}"})
                    codes[r.status_code] += 1
                    if r.status_code == 200:
                        ok_cases.append(r.json()["case_id"])
                except httpx.HTTPError as exc:
                    codes[type(exc).__name__] += 1
                lat.append(time.perf_counter() - t0)

    async def ticker():
        t0 = time.monotonic()
        while time.monotonic() < t_end:
            await asyncio.sleep(0.2)
            if on_tick:
                on_tick(time.monotonic() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(ticker(), *(client(i) for i in range(clients)))
    return lat, codes, ok_cases, time.perf_counter() - t0


def report(name: str, lat, codes, wall: float) -> dict:
    n = sum(codes.values())
    ok = codes.get(200, 0)
    a = np.asarray(lat) * 1000
    row = {"scenario": name, "requests": n, "ok": ok, "req_s": ok / wall, "p50": float(np.percentile(a, 50)),
           "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99)),
           "errors": {str(k): v for k, v in codes.items() if k != 200}}
    print(f"{name:8s} {ok:6d} ok in {wall:5.1f} s = {row['req_s']:6.1f} req/s; p50 {row['p50']:6.0f} ms, "
          f"p95 {row['p95']:6.0f} ms, p99 {row['p99']:6.0f} ms; errors {row['errors'] or 0}", flush=True)
    return row


def breakdown(before: dict, after: dict, answers: int, cpu_s: float | None, wall: float) -> dict:
    """Milliseconds per answer in each serving stage of the web process, and its CPU time per answer. Stages are
    wall times on their threads, so they overlap across requests; ``request`` is an upload's whole time on the
    server (waiting for the model included), and the CPU line is what an answer costs the machine."""
    from uplink_server.stages import per_answer

    ms = per_answer(before, after, answers)
    cpu = per_answer(before, after, answers, "cpu_seconds")
    request = ms.pop("request", None)
    cpu.pop("request", None)
    print(f"{'':8s} per answer, wall ms (waits included): " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()), flush=True)
    print(f"{'':8s} per answer, CPU ms of the stage's thread: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()), flush=True)
    if request is not None:
        print(f"{'':8s} an upload's time on the server {request:.0f} ms (queue for the model included)", flush=True)
    if cpu_s is not None:
        print(f"{'':8s} web process CPU {1000 * cpu_s / max(1, answers):.1f} core-ms per answer "
              f"({cpu_s / wall:.2f} cores busy of {os.cpu_count()})", flush=True)
    transactions, units = writer_counts(before, after)
    if transactions:
        print(f"{'':8s} database writer: {transactions} transactions for {units} units, mean {units / transactions:.2f} "
              "per transaction", flush=True)
    return {"wall": ms, "cpu": cpu, "request": request, "cpu_ms": None if cpu_s is None else 1000 * cpu_s / max(1, answers),
            "writer_transactions": transactions, "writer_units": units}


def writer_counts(before: dict, after: dict) -> tuple[int, int]:
    """Transactions and units the group writer committed between two stage snapshots (web_app.writer)."""
    from web_app.writer import UNITS_STAGE, WRITER_STAGE

    def delta(name):
        return after.get(name, {}).get("count", 0) - before.get(name, {}).get("count", 0)

    return delta(WRITER_STAGE), delta(UNITS_STAGE)


def _py_spy(stack: Stack, args, name: str):
    """py-spy recording the web process for the run (``--py-spy PREFIX``), where py-spy is installed."""
    if not args.py_spy:
        return None
    import shutil

    exe = shutil.which("py-spy")
    if exe is None:
        print(f"{'':8s} py-spy not installed (pip install py-spy): no profile", flush=True)
        return None
    # --gil: only the thread holding Python's GIL is sampled, so the shares say what one process's Python can do
    return subprocess.Popen([exe, "record", "--pid", str(stack.procs[0].pid), "--duration", str(int(args.seconds)),
                             "--rate", "50", "--nonblocking", "--format", "raw", "--output", f"{args.py_spy}-{name}.txt",
                             *(["--gil"] if args.gil else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _library(frame: str) -> str:
    """The package a sampled frame's file belongs to: "sqlalchemy/orm/session.py:12" -> sqlalchemy, this project's
    folders by name, a bare "threading.py" -> stdlib."""
    m = re.search(r"\(([^()]*?):\d+\)$", frame)
    path = m.group(1) if m else ""
    if "/" in path:
        return path.split("site-packages/")[-1].split("/")[0]
    return "stdlib" if path.endswith(".py") else "other"


def top_libraries(collapsed: Path, n: int = 12) -> list[tuple[str, float]]:
    """Samples by the library of their innermost Python frame, as shares (with --gil: of the GIL's time)."""
    libs = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            libs[_library(stack.split(";")[-1])] += int(count)
    total = sum(libs.values()) or 1
    return [(k, v / total) for k, v in libs.most_common(n)]


def top_frames(collapsed: Path, n: int = 12) -> list[tuple[str, float]]:
    """The functions where the sampled threads were (self time, idle waits left out), as shares of the samples."""
    leaves = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        if any(w in leaf for w in ("wait (", "select (", "epoll", "_wait_for_tstate_lock", "acquire (", "sleep")):
            continue
        leaves[re.sub(r" \(.*?([^/]+:\d+)\)$", r" (\1)", leaf)] += int(count)
    total = sum(leaves.values()) or 1
    return [(k, v / total) for k, v in leaves.most_common(n)]


def audit_counts(stack: Stack) -> tuple[dict, Counter]:
    """(status of every case, classify writes per case) through the API."""
    h = {"Authorization": f"Bearer {stack.token}"}
    cases, page = [], [None]
    while page:
        page = httpx.get(stack.bases[0] + "/api/v1/cases", params={"limit": 1000, "offset": len(cases)}, headers=h,
                         timeout=120).json()
        cases += page
    text = httpx.get(stack.bases[0] + "/api/v1/audit.csv", params={"action": "classify"}, headers=h, timeout=120).text
    writes = Counter(int(r["case_id"]) for r in csv.DictReader(io.StringIO(text)) if r["case_id"])
    return {c["id"]: c["status"] for c in cases}, writes


def run(name: str, args, images, nodes=1, servers=0, local=False, kill=False) -> dict | None:
    if servers and not _reachable("127.0.0.1", 5672):
        print(f"{name:8s} skipped: RabbitMQ not reachable on 127.0.0.1:5672")
        return None
    db = PG if nodes > 1 and _reachable("127.0.0.1", 5432) else None
    if db:
        _reset_postgres()
    stack = Stack(nodes, servers, local, db, args.model, args.server_threads)
    try:
        asyncio.run(load(stack.bases, stack.token, images, min(args.clients, 8), 3))  # warm up
        killed = {}

        def tick(t):
            if kill and not killed and t > args.seconds / 3:
                stack.servers[0].send_signal(signal.SIGKILL)
                killed["at"] = t

        stages0, cpu0 = stack.stages(), stack.cpu_seconds()
        spy = _py_spy(stack, args, name)
        lat, codes, ok_cases, wall = asyncio.run(load(stack.bases, stack.token, images, args.clients, args.seconds, tick))
        stages1, cpu1 = stack.stages(), stack.cpu_seconds()
        row = report(name, lat, codes, wall)
        row["stages_ms"] = breakdown(stages0, stages1, codes.get(200, 0), None if cpu0 is None else cpu1 - cpu0, wall)
        if spy is not None:
            spy.wait(args.seconds + 30)
            out = Path(f"{args.py_spy}-{name}.txt")
            if out.is_file():
                print(f"{'':8s} py-spy, busy samples of the web process by function ({out}):", flush=True)
                for frame, share in top_frames(out):
                    print(f"{'':10s}{100 * share:5.1f} %  {frame}", flush=True)
                print(f"{'':8s} the same samples by library:", flush=True)
                for lib, share in top_libraries(out):
                    print(f"{'':10s}{100 * share:5.1f} %  {lib}", flush=True)
        row.update(nodes=nodes, servers=servers, database="postgresql" if db else "sqlite")
        if kill:
            time.sleep(3)  # let redelivered jobs land
            status, writes = audit_counts(stack)
            five = sum(v for k, v in codes.items() if str(k).startswith("5"))
            lost = [i for i in ok_cases if status.get(i) != "done"] + [i for i, s in status.items() if s == "pending"]
            dup = [i for i, w in writes.items() if w > 1]
            row.update(lost=len(lost), duplicated=len(dup), http_5xx=five, killed_at_s=killed.get("at"))
            print(f"{'':8s} model server ms1 killed at {killed.get('at', 0):.1f} s: {len(status)} cases, "
                  f"{len(lost)} lost, {len(dup)} written twice, {five} HTTP 5xx", flush=True)
        b = (stack.status().get("broker") or {})
        if b:
            print(f"{'':8s} broker: " + ", ".join(f"{s['name']} served {s['served']} (redelivered to it {s['redelivered']}, mean batch {s['mean_batch']}, {s['health']})"
                                                  for s in b.get("servers", [])), flush=True)
        elif stack.status().get("local"):
            bt = stack.status()["local"]["batching"]
            print(f"{'':8s} in-process model: {bt['batches']} batches, mean batch {bt['mean_batch']}, "
                  f"{bt['model_s']:.1f} s in model runs", flush=True)
        return row
    finally:
        stack.close()


def _reset_postgres() -> None:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS user_sessions, reviews, site_settings, site_calibrations, audit_log, api_tokens, cases, users, sign_in_failures, alembic_version CASCADE")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--scenarios", default="local,broker1,broker2,nodes2,kill")
    ap.add_argument("--model", default=None, help="model file for every server (default: the shipped one)")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="--threads of each model server (1: one core each, one batch at a time; 2: both cores of "
                         "this machine, two batches at a time)")
    ap.add_argument("--gil", action="store_true", help="with --py-spy: sample only the thread holding the GIL")
    ap.add_argument("--py-spy", default="", metavar="PREFIX",
                    help="record the web process with py-spy (collapsed stacks in PREFIX-SCENARIO.txt) and print its top functions")
    args = ap.parse_args(argv)
    images = real_images()
    print(f"# {os.cpu_count()} cores; {args.clients} clients x {args.seconds:.0f} s; {len(images)} real X-rays; loopback")
    plans = {"local": dict(local=True), "broker1": dict(servers=1), "broker2": dict(servers=2),
             "nodes2": dict(nodes=2, servers=2), "kill": dict(servers=2, kill=True)}
    for name in args.scenarios.split(","):
        run(name, args, images, **plans[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
