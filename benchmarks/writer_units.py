"""CPU per upload row written by the web app's group writer: the ORM (as shipped) against SQLAlchemy Core.

The writer thread was the next suspect for the upload path's cost (BENCHMARKS.md, issue 25). This writes the rows
one upload makes (its case, the case's name from its id, the audit entry), three uploads per transaction as the
writer groups them under load, into a fresh SQLite file with the web app's own engine settings, both ways, twice
each, and prints the thread CPU per upload. Run: ``python -m benchmarks.writer_units``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import insert, update
from sqlalchemy.orm import make_transient_to_detached, sessionmaker

from web_app.cases import give_unset_columns
from web_app.db import AuditLog, Base, Case, User, make_engine, utcnow

PER_TRANSACTION = 3  # mean units per writer transaction in bench_load (2.5-2.7)


def _values(user_id: int) -> dict:
    return dict(patient_code="P-1", created_by=user_id, filename="", uncertain=False, image_path="x.png",
                image_stats={"mean": 0.5, "std": 0.2}, status="pending", job_id=uuid.uuid4().hex, attempts=1,
                claimed_at=utcnow())


def _detail() -> dict:
    return {"format": "JPEG", "bytes": 123456}


def orm_unit(db, user_id: int) -> Case:
    """What web_app.cases.create_case's unit does."""
    case = Case(**_values(user_id))
    give_unset_columns(case)
    db.add(case)
    db.flush()
    case.filename = f"case-{case.id}.jpg"
    db.add(AuditLog(user_id=user_id, action="upload", case_id=case.id, detail=_detail()))
    return case


def core_unit(db, user_id: int) -> Case:
    """The same rows as statements, and a detached object built from the values for the reply."""
    values = {**_values(user_id), "created_at": utcnow()}
    case_id = db.execute(insert(Case).values(**values)).inserted_primary_key[0]
    db.execute(update(Case).where(Case.id == case_id).values(filename=f"case-{case_id}.jpg"))
    db.execute(insert(AuditLog).values(user_id=user_id, action="upload", case_id=case_id, detail=_detail(), at=utcnow()))
    case = Case(**{**values, "id": case_id, "filename": f"case-{case_id}.jpg"})
    give_unset_columns(case)
    make_transient_to_detached(case)
    return case


def measure(unit, sessions, user_id: int, transactions: int) -> float:
    t0 = time.thread_time()
    for _ in range(transactions):
        with sessions() as db:
            for _ in range(PER_TRANSACTION):
                unit(db, user_id)
            db.commit()
    return (time.thread_time() - t0) / (transactions * PER_TRANSACTION) * 1000


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transactions", type=int, default=200)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'bench.db'}")
        Base.metadata.create_all(engine)
        sessions = sessionmaker(engine, expire_on_commit=False)
        with sessions() as db:
            user = User(email="bench@example.org", password_hash="-", role="technician")
            db.add(user)
            db.commit()
            user_id = user.id
        for unit in (orm_unit, core_unit, orm_unit, core_unit):  # alternated: the first rounds warm the caches
            ms = measure(unit, sessions, user_id, args.transactions)
            print(f"{unit.__name__:10s} {ms:5.2f} ms thread CPU per upload ({PER_TRANSACTION} per transaction)")
        engine.dispose()


if __name__ == "__main__":
    main()
