"""Database models (SQLAlchemy 2) and session handling. Schema changes go
through Alembic migrations in ``web_app/migrations``."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    relationship,
    sessionmaker,
)

from model_training.data.labels import NORMAL
from uplink_server.stages import CLOCK

ROLES = ("admin", "doctor", "technician")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(255), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(20), default="technician")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Case(Base):
    __tablename__ = "cases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_code: Mapped[str] = mapped_column(String(64), index=True, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    created_by: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255), default="")
    image_path: Mapped[str] = mapped_column(String(512), default="")
    heatmap_path: Mapped[str | None] = mapped_column(String(512), nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="pending", index=True)  # done|refused|pending
    label: Mapped[str | None] = mapped_column(String(32), nullable=True)
    probabilities: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    uncertain: Mapped[bool] = mapped_column(Boolean, default=False)
    refusal_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    refusal_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    risk: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    model_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    served_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    elapsed_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the attempt whose answer is awaited
    # what the model said (its card's calibration) and the site calibration applied on top, if any
    model_probabilities: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    calibration_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    image_stats: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # gray mean/std, for drift checks
    # triage (uplink_server.triage): the model's "needs a doctor's read" and the card threshold it used;
    # NULL for cases from before 2.0.0 (see ``triage_flag``)
    needs_read: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    attempts: Mapped[int | None] = mapped_column(Integer, nullable=True)  # model runs tried (resumer's bound)
    # when an analysis of this pending case last started, on any node: the resumers of other nodes leave it alone
    # until a lease has passed (cases.resumable); None once that analysis ended without an answer
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    triage_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    creator: Mapped[User] = relationship()

    @property
    def triage_flag(self) -> bool | None:
        """Needs a doctor's read: the model's own triage, else (older models and cases) its class not normal;
        None when there is no result."""
        if self.status != "done" or not self.label:
            return None
        return self.needs_read if self.needs_read is not None else self.label != NORMAL

    # the doctors' readings, newest first (the first one counts)
    reviews: Mapped[list["Review"]] = relationship(order_by="Review.id.desc()", viewonly=True)


class Review(Base):
    """A doctor's reading of a case. Never edited: a new reading is a new row, the newest counts."""

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    reading: Mapped[str] = mapped_column(String(32))  # reviews.READINGS
    agrees: Mapped[bool] = mapped_column(Boolean)  # with the AI's result
    note: Mapped[str] = mapped_column(Text, default="")
    reviewer: Mapped[User] = relationship()


class SiteCalibration(Base):
    """A temperature and uncertainty margin fitted on this site's reviewed cases for one model version."""

    __tablename__ = "site_calibrations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(200), index=True)  # "name version"
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    created_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    temperature: Mapped[float] = mapped_column(Float)
    margin_threshold: Mapped[float] = mapped_column(Float)
    n_cases: Mapped[int] = mapped_column(Integer)
    check: Mapped[dict] = mapped_column(JSON)  # the held-out half: before and after
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    previous_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # what a rollback goes back to
    rolled_back_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    creator: Mapped[User] = relationship()


class SiteSetting(Base):
    """Switches an admin sets for this site (e.g. technicians may review)."""

    __tablename__ = "site_settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255), default="")


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    token_hash: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_used: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    user: Mapped[User] = relationship()

    def state(self, now: dt.datetime | None = None) -> str:
        """active | expired | revoked"""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and (now or utcnow()) >= self.expires_at:
            return "expired"
        return "active"


class UserSession(Base):
    """A browser's sign-in. The session cookie carries ``id`` (a hash of it is not needed: the cookie is signed and
    the id alone grants nothing once revoked)."""

    __tablename__ = "user_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class AuditLog(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"), nullable=True)
    detail: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    address: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the client's IP address
    user: Mapped[User | None] = relationship()


class SignInFailures(Base):
    """Failed sign-ins per account (email as typed) and per client address, for throttling."""

    __tablename__ = "sign_in_failures"
    __table_args__ = (UniqueConstraint("scope", "key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(16))  # account | address
    key: Mapped[str] = mapped_column(String(255))
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    blocked_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


def make_engine(url: str):
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    # connections are released while the model works (web_app.cases.classify_case); a burst still needs more than
    # the default 5 + 10, and a wait beyond pool_timeout becomes a 503 (web_app.app), never a 500
    engine = create_engine(url, connect_args={"check_same_thread": False}, pool_size=10, max_overflow=40, pool_timeout=10)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record):
        # deleted or overwritten rows are zeroed on disk, not left in free pages
        dbapi_conn.execute("PRAGMA secure_delete = ON")
        # write-ahead log: readers do not wait for writers, and a commit costs one
        # append (NORMAL survives a crash of the app; a power cut may lose the last commits)
        dbapi_conn.execute("PRAGMA journal_mode = WAL")
        dbapi_conn.execute("PRAGMA synchronous = NORMAL")
        dbapi_conn.execute("PRAGMA busy_timeout = 15000")

    _one_writer_at_a_time(engine)
    return engine


BUSY_TIMEOUT_S = 15.0
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


def _one_writer_at_a_time(engine) -> None:
    """This process's SQLite writers queue on one lock instead of in SQLite's busy handler.

    SQLite lets one connection write at a time; the others poll, sleeping 1, 2, 5 ... 100 ms between tries, so
    under load a write waits long after the lock is free (measured: 235-340 ms of wall time per upload against
    12-15 ms of CPU). A thread blocked on this lock wakes as soon as the writer before it commits. The lock is
    taken at a transaction's first write and let go at its end, exactly the span SQLite's own lock covers, so no
    new waits appear; other processes (the CLI, a second node) still meet SQLite's busy timeout.
    """
    lock = threading.Lock()
    holders: dict[int, float] = {}  # id of each DBAPI connection that holds it: since when

    def release(conn) -> None:
        key = id(getattr(conn, "dbapi_connection", conn))  # the pool's proxy or the sqlite3 connection itself
        since = holders.pop(key, None)
        if since is not None:
            lock.release()
            CLOCK.add("write lock held", time.perf_counter() - since, 0.0)

    @event.listens_for(engine, "before_cursor_execute")
    def _take(conn, _cursor, statement, _params, _context, _executemany):
        raw = conn.connection.dbapi_connection
        if id(raw) in holders or not statement.lstrip()[:7].upper().startswith(_WRITES):
            return
        t0 = time.perf_counter()
        # a timeout falls back on SQLite's own wait (and its "database is locked" error), as before this lock
        if lock.acquire(timeout=BUSY_TIMEOUT_S):
            holders[id(raw)] = time.perf_counter()
        CLOCK.add("write lock wait", time.perf_counter() - t0, 0.0)

    # let go once SQLite has let go (after its COMMIT or ROLLBACK), or the next writer meets SQLite's lock and sleeps
    dialect = engine.dialect
    for name in ("do_commit", "do_rollback"):
        def wrapped(dbapi_conn, _end=getattr(dialect, name)):
            try:
                _end(dbapi_conn)
            finally:
                release(dbapi_conn)
        setattr(dialect, name, wrapped)

    # a connection given back to the pool mid-transaction is rolled back there; one closed or dropped ends its own
    @event.listens_for(engine.pool, "reset")
    def _reset(dbapi_connection, connection_record, reset_state):
        release(dbapi_connection)

    @event.listens_for(engine.pool, "close")
    def _close(dbapi_connection, connection_record):
        release(dbapi_connection)

    @event.listens_for(engine.pool, "invalidate")
    def _invalidate(dbapi_connection, connection_record, exception):
        release(dbapi_connection)


def migrations_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str) -> None:
    """Bring the schema to the latest migration."""
    from alembic import command

    command.upgrade(migrations_config(url), "head")


def session_factory(engine):
    return sessionmaker(engine, expire_on_commit=False)
