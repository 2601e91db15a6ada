"""SQLite writers of one process queue on one lock (web_app.db._one_writer_at_a_time): nothing is lost, a waiting
writer goes on as soon as the one before it ends, and every way a transaction can end lets go of the lock."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import event, text

from web_app import db as dbmod


def _engine(tmp_path):
    engine = dbmod.make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.begin() as c:
        c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, who TEXT)"))
    return engine


def _all_at_once(fn, n: int) -> list:
    """fn(0) ... fn(n - 1) on n threads at once; the exceptions they raised."""
    errors = []

    def run(k):
        try:
            fn(k)
        except Exception as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors


def _count(engine) -> int:
    with engine.connect() as c:
        return c.execute(text("SELECT count(*) FROM t")).scalar()


def test_many_threads_writing_at_once_all_land(tmp_path):
    engine = _engine(tmp_path)

    def writer(k):
        for i in range(25):
            with engine.begin() as c:
                c.execute(text("INSERT INTO t (who) VALUES (:w)"), {"w": f"{k}-{i}"})
                c.execute(text("UPDATE t SET who = who || '!' WHERE who = :w"), {"w": f"{k}-{i}"})

    assert _all_at_once(writer, 12) == []
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


# --- web_app.writer: the upload path's rows, several uploads per transaction ---------------------------------------

def _sessions(engine):
    from sqlalchemy.orm import sessionmaker

    return sessionmaker(engine, expire_on_commit=False)


def _insert(who):
    def unit(s):
        s.execute(text("INSERT INTO t (who) VALUES (:w)"), {"w": who})
        return s.execute(text("SELECT id FROM t WHERE who = :w"), {"w": who}).scalar()
    return unit


def test_the_group_writer_lands_every_callers_row_once(tmp_path):
    from web_app import writer as wmod

    engine = _engine(tmp_path)
    commits = []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    w = wmod.GroupWriter(engine).start()
    wmod.register(engine, w)
    ids = {}
    gate = threading.Barrier(16)

    def caller(k):
        with _sessions(engine)() as s:
            gate.wait()
            ids[k] = wmod.write(s, _insert(f"u{k}"))

    errors = _all_at_once(caller, 16)
    wmod.register(engine, None)
    w.stop()
    assert errors == []
    assert _count(engine) == 16 and len(set(ids.values())) == 16  # every caller got its own row's id back
    assert w.units == 16 and w.batches == len(commits)  # one commit per batch (how many met in one: timing)


def test_the_stage_clock_counts_the_writers_transactions_and_units(tmp_path):
    """bench_load reports units per transaction from the stage clock: the counts are the writer's own."""
    from benchmarks.bench_load import writer_counts
    from uplink_server.stages import CLOCK
    from web_app import writer as wmod

    engine = _engine(tmp_path)
    before = CLOCK.snapshot()
    w = wmod.GroupWriter(engine)  # five units queued before the thread starts: they meet in one transaction
    futs = [w.submit(_insert(f"q{k}")) for k in range(5)]
    w.start()
    assert all(f.result(10) for f in futs)
    w.submit(_insert("alone")).result(10)
    w.stop()
    assert writer_counts(before, CLOCK.snapshot()) == (w.batches, w.units) == (2, 6)


def test_a_failing_unit_fails_only_its_own_caller(tmp_path):
    from web_app import writer as wmod

    engine = _engine(tmp_path)
    w = wmod.GroupWriter(engine)  # not started yet: the three units below queue up and meet in one batch

    def bad(s):
        s.execute(text("INSERT INTO t (who) VALUES ('bad')"))
        s.execute(text("INSERT INTO nowhere VALUES (1)"))

    futs = [w.submit(_insert("a")), w.submit(bad), w.submit(_insert("b"))]
    w.start()
    assert futs[0].result(10) and futs[2].result(10)
    with pytest.raises(Exception, match="nowhere"):
        futs[1].result(10)
    w.stop()
    with engine.connect() as c:
        assert sorted(c.execute(text("SELECT who FROM t")).scalars()) == ["a", "b"]  # the bad unit's first row too is gone
    assert w.batches == 1  # queued together: one transaction for the three


def test_without_a_group_writer_the_callers_session_commits(tmp_path):
    from web_app import writer as wmod

    engine = _engine(tmp_path)
    with _sessions(engine)() as s:
        assert wmod.write(s, _insert("solo")) == 1
        assert not s.in_transaction()
    assert _count(engine) == 1
    w = wmod.GroupWriter(engine).start()
    w.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        w.submit(_insert("late")).result(1)  # a stopped writer says so instead of leaving its caller waiting
