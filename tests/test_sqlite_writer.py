"""SQLite writers of one process queue on one lock (web_app.db._one_writer_at_a_time): nothing is lost, a waiting
writer goes on as soon as the one before it ends, and every way a transaction can end lets go of the lock."""

from __future__ import annotations

import threading
import time

from sqlalchemy import event, text

from web_app import db as dbmod


def _engine(tmp_path):
    engine = dbmod.make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.begin() as c:
        c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, who TEXT)"))
    return engine


def _count(engine) -> int:
    with engine.connect() as c:
        return c.execute(text("SELECT count(*) FROM t")).scalar()


def test_many_threads_writing_at_once_all_land(tmp_path):
    engine = _engine(tmp_path)
    errors = []

    def writer(k):
        try:
            for i in range(25):
                with engine.begin() as c:
                    c.execute(text("INSERT INTO t (who) VALUES (:w)"), {"w": f"{k}-{i}"})
                    c.execute(text("UPDATE t SET who = who || '!' WHERE who = :w"), {"w": f"{k}-{i}"})
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert _count(engine) == 12 * 25


def test_a_second_writer_waits_for_the_first_to_commit_and_readers_never_wait(tmp_path):
    engine = _engine(tmp_path)
    reached_sqlite = []  # statements past the lock (listeners run in the order they were added)
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, stmt, *_: reached_sqlite.append(stmt))
    first = engine.connect()
    tx = first.begin()
    first.execute(text("INSERT INTO t (who) VALUES ('first')"))
    done = threading.Event()

    def second():
        with engine.begin() as c:
            c.execute(text("INSERT INTO t (who) VALUES ('second')"))
        done.set()

    th = threading.Thread(target=second)
    th.start()
    assert not done.wait(0.5)  # the first still holds the write
    # the second waits on the lock, woken when the first ends, not inside SQLite's sleeping busy handler
    assert not any("second" in s for s in reached_sqlite)
    assert _count(engine) == 0  # a reader is not held up (and sees only what was committed)
    tx.commit()
    assert done.wait(5)
    th.join()
    first.close()
    assert _count(engine) == 2


def test_a_rolled_back_or_abandoned_writer_lets_go(tmp_path, monkeypatch):
    monkeypatch.setattr(dbmod, "BUSY_TIMEOUT_S", 3.0)  # a leaked lock shows as a wait of 3 s, not 15
    engine = _engine(tmp_path)
    with engine.connect() as c:  # rolled back
        with c.begin() as tx:
            c.execute(text("INSERT INTO t (who) VALUES ('gone')"))
            tx.rollback()
    c = engine.connect()  # given back to the pool mid-transaction: the pool rolls it back
    c.begin()
    c.execute(text("INSERT INTO t (who) VALUES ('abandoned')"))
    c.close()
    c = engine.connect()  # a failed statement inside the transaction, then rollback
    tx = c.begin()
    c.execute(text("INSERT INTO t (who) VALUES ('before')"))
    try:
        c.execute(text("INSERT INTO t (id, who) VALUES (1, 'clash'), (1, 'clash')"))
    except Exception:  # noqa: BLE001 - the constraint error is the point
        tx.rollback()
    c.close()
    t0 = time.monotonic()
    with engine.begin() as c:
        c.execute(text("INSERT INTO t (who) VALUES ('after')"))
    assert time.monotonic() - t0 < 2.0
    with engine.connect() as c:
        assert [r[0] for r in c.execute(text("SELECT who FROM t"))] == ["after"]
