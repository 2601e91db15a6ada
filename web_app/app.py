"""FastAPI application factory."""

from __future__ import annotations

import asyncio
import logging
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from uplink_server.stages import stage

from .config import Settings
from .db import User, make_engine, migrate, session_factory
from .deps import LoginRequired, csrf_token
from .i18n import translate
from .inference import ModelRouter, serve_uplink
from .security import hash_password
from .writer import GroupWriter
from .writer import register as register_writer

log = logging.getLogger(__name__)
HERE = Path(__file__).parent


# Every response: nothing loads from another origin, no page may be framed (clickjacking), types are not sniffed,
# and no address leaves in a Referer. Inline handlers and styles stay allowed: the pages use a few of their own.
TIMED_PATHS = ("/api/v1/predict", "/upload")
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                                "img-src 'self' data: blob:; media-src 'self' blob:; connect-src 'self'; object-src 'none'; "
                                "base-uri 'self'; form-action 'self'; frame-ancestors 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def ensure_admin(SessionLocal, settings: Settings) -> str | None:
    """Create the first admin if there is no user; returns a generated password to print."""
    with SessionLocal() as db:
        if db.scalar(select(User).limit(1)) is not None:
            return None
        password = settings.admin_password or secrets.token_urlsafe(12)
        db.add(User(email=settings.admin_email, name="Administrator", password_hash=hash_password(password), role="admin"))
        db.commit()
        return None if settings.admin_password else password


def load_local_model(settings: Settings):
    if not settings.local_model:
        return None
    from uplink_server.model import Classifier, ModelNotFound

    try:
        return Classifier(settings.model_path, threads=settings.model_threads or None)
    except ModelNotFound as exc:
        log.warning("no in-process model: %s", exc)
        print(f"warning: no in-process model ({exc}); waiting for model servers to connect", flush=True)
        return None


async def connect_broker(router: ModelRouter, settings: Settings, SessionLocal) -> None:
    """Connect to the broker, retrying while it is down (the app serves meanwhile)."""
    from .broker import BrokerClient
    from .cases import result_writer

    client = BrokerClient(settings.broker_url, settings.node_name, result_writer(SessionLocal, settings), settings.broker_prefix)
    delay = 1.0
    while True:
        try:
            await client.start()
            router.broker = client
            print(f"broker: node {settings.node_name} connected to {client.status_url}", flush=True)
            return
        except Exception as exc:
            print(f"warning: broker {client.status_url} unreachable ({exc}); retrying in {delay:.0f} s", flush=True)
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)


def create_app(settings: Settings | None = None, classifier="auto") -> FastAPI:
    settings = settings or Settings.from_env()
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    SessionLocal = session_factory(engine)
    generated = ensure_admin(SessionLocal, settings)
    if generated:
        print(f"First admin account: {settings.admin_email} / password: {generated}  (change it, or set CXR_ADMIN_PASSWORD)", flush=True)
    local = load_local_model(settings) if classifier == "auto" else classifier
    router = ModelRouter(local, timeout=settings.uplink_timeout_s, max_batch=settings.max_batch,
                         max_delay_ms=settings.batch_delay_ms, max_waiting=settings.max_queue,
                         queue_wait_s=settings.queue_wait_s, model_runs=settings.model_runs or None)

    @asynccontextmanager
    async def lifespan(app):
        from .cases import resume_pending

        db_writer = GroupWriter(engine).start()  # the upload path's rows, several uploads per transaction
        register_writer(engine, db_writer)
        app.state.db_writer = db_writer
        task = asyncio.create_task(connect_broker(router, settings, SessionLocal)) if settings.broker_url else None
        resumer = asyncio.create_task(resume_pending(SessionLocal, settings, router, settings.resume_interval_s))
        node = None
        if settings.dicom_port:
            from .dicom_node import DicomNode

            node = DicomNode(settings, SessionLocal, router, asyncio.get_running_loop())
            node.start()
        app.state.dicom_node = node
        yield
        if node is not None:
            node.stop()
        resumer.cancel()
        if task is not None:
            task.cancel()
        if router.broker is not None:
            await router.broker.close()
        if router.batcher is not None:
            router.batcher.stop()
        register_writer(engine, None)  # a late write goes to its own session
        db_writer.stop()  # after what was queued is committed
        engine.dispose()

    app = FastAPI(title="Chest X-ray screening", version="0.1.0", lifespan=lifespan,
                  description="Screening support only, not a diagnosis. REST API under /api/v1; authenticate with `Authorization: Bearer <token>`.")
    app.state.settings = settings
    app.state.SessionLocal = SessionLocal
    app.state.router = router
    app.state.generated_admin_password = generated
    app.state.dicom_node = None
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.state.templates = templates
    app.add_middleware(SessionMiddleware, secret_key=settings.secret_key, same_site="lax",
                       https_only=settings.secure_cookies, session_cookie="cxr_session", max_age=12 * 3600)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        if request.method == "POST" and request.url.path in TIMED_PATHS:  # the upload's whole time on the server
            with stage("request"):
                response = await call_next(request)
        else:
            response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    from .routes import PAGE_ROUTERS, api

    for page_router in PAGE_ROUTERS:
        app.include_router(page_router)
    app.include_router(api.router, prefix="/api/v1")

    @app.websocket("/uplink/ws")
    async def uplink_ws(ws: WebSocket):
        await serve_uplink(ws, router, settings.uplink_key)

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        # "saturated": uploads are being turned away (503) right now; monitoring should see it, not only "ok"
        return {"ok": True, "model_available": router.available, "saturated": router.saturated,
                **(await router.full_status())}

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, exc: LoginRequired):
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))
        lang = request.session.get("lang", "en") if "session" in request.scope else "en"
        msg = {403: translate("forbidden", lang), 404: translate("not_found", lang)}.get(exc.status_code, str(exc.detail))
        user = None  # signed-in users keep their navigation on error pages
        if "session" in request.scope and request.session.get("user_id"):
            from .sessions import current_user

            with SessionLocal() as db:
                user = current_user(request.session, db)
        from .security import can

        html = templates.get_template("error.html").render(
            request=request, message=msg, t=lambda k: translate(k, lang), lang=lang, user=user, status=exc.status_code,
            can=lambda p: user is not None and can(user.role, p), csrf=csrf_token(request) if "session" in request.scope else "",
            notice=translate("notice", lang))
        return HTMLResponse(html, status_code=exc.status_code)

    from sqlalchemy.exc import TimeoutError as PoolTimeout

    @app.exception_handler(PoolTimeout)
    async def _pool(request: Request, exc: PoolTimeout):  # every database connection busy: come back, not a 500
        log.warning("database connections exhausted on %s", request.url.path)
        body = "the server is busy; try again in a few seconds"
        headers = {"Retry-After": "5"}
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": body}, status_code=503, headers=headers)
        return HTMLResponse(f"<h1>Busy</h1><p>{body}</p>", status_code=503, headers=headers)

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):  # never a stack trace to the user
        log.exception("unhandled error on %s", request.url.path)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "internal error; the upload was kept if it was received"}, status_code=500)
        return HTMLResponse("<h1>Something went wrong</h1><p>The error was logged. Your upload was kept if it was received.</p>", status_code=500)

    return app
