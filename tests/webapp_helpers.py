"""A real web app on a free local port, and a signed-in HTTP client."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

ADMIN = ("admin@localhost", "admin-pass-123")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextmanager
def live_app(tmp_path, classifier=None, port: int | None = None, database_url: str | None = None, **settings_over):
    from web_app.app import create_app
    from web_app.config import Settings

    over = {"admin_password": ADMIN[1], "uplink_timeout_s": 20.0, **settings_over}
    if database_url:
        over["database_url"] = database_url
    settings = Settings.from_env(tmp_path, **over)
    app = create_app(settings, classifier=classifier)
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws_max_size=128 * 1024 * 1024))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def sign_in(base: str, email: str = ADMIN[0], password: str = ADMIN[1], lang: str = "en") -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=base, follow_redirects=True, timeout=60, headers={"Accept-Language": lang})
    r = c.get("/login")
    r = c.post("/login", data={"email": email, "password": password, "csrf_token": csrf_of(r.text), "next": "/"})
    assert r.status_code == 200 and "/login" not in str(r.url), r.text[:500]
    return c, csrf_of(r.text)


def new_token(client: httpx.Client, csrf: str) -> str:
    r = client.post("/tokens", data={"csrf_token": csrf, "name": "test"})
    return re.search(r'data-testid="new-token">([^<]+)<', r.text).group(1)


def add_user(client: httpx.Client, csrf: str, email: str, role: str, password: str = "user-pass-123") -> None:
    r = client.post("/admin/users", data={"csrf_token": csrf, "email": email, "name": role, "password": password, "role": role})
    assert r.status_code == 200, r.text[:300]


def _run_client_in_thread(client):
    """Run a model server's uplink client on an event loop of its own."""
    loop = asyncio.new_event_loop()
    th = threading.Thread(target=lambda: loop.run_until_complete(client.run_forever()), daemon=True)
    th.start()
    return loop, th


def wait_until(pred, timeout: float = 30.0) -> bool:
    """Poll pred() until true or timeout (for things that happen on other threads or processes)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.05)
    return False


def wait_js(page, expression: str, timeout: float = 15.0) -> None:
    """Wait until a JavaScript expression is truthy on the page. Playwright's wait_for_function polls by
    evaluating a string inside the page, which the app's Content-Security-Policy (no 'unsafe-eval') refuses
    whenever the first check is false; page.evaluate goes through the debugger protocol and is not refused."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true after {timeout} s: {expression}")
        time.sleep(0.05)
