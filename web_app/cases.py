"""Creating and (re)classifying cases: the one code path behind pages and API."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import logging
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from sqlalchemy import func, or_, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from starlette.concurrency import run_in_threadpool

from model_training.data.labels import CLASSES
from uplink_server import deidentify, drift, gradcam
from uplink_server.errors import Refusal
from uplink_server.imaging import DecodedImage, decode
from uplink_server.stages import stage
from uplink_server.uncertainty import margin

from . import writer
from .broker import JobPending
from .config import Settings
from .db import AuditLog, Case, User, utcnow
from .inference import Job, ModelRouter, ModelUnavailable, Outcome, Saturated
from .recalibration import active as active_calibration
from .recalibration import apply_to as apply_calibration
from .reviews import model_key, review_dict
from .spreadsheet import to_csv

log = logging.getLogger(__name__)

class UploadError(ValueError):
    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass
class Upload:
    filename: str  # as sent: a hint for messages only, never stored (it is often the patient's name)
    data: bytes


# HTTP status of a refusal made before any model ran
REFUSAL_STATUS = {"file_too_large": 413, "too_many_pixels": 413, "not_an_image": 415, "unsupported_format": 415}


async def read_upload(f, settings: Settings) -> Upload:
    """Read at most the size limit (+1 byte to notice a larger file) into memory."""
    limit = settings.max_upload_mb * 1024 * 1024
    data = await f.read(limit + 1)
    if len(data) > limit:
        raise UploadError("file_too_large", f"{f.filename}: larger than {settings.max_upload_mb} MB", 413)
    return Upload(f.filename or "upload", data)


def is_zip(up: Upload) -> bool:
    return up.data[:4] == b"PK\x03\x04" or Path(up.filename).suffix.lower() == ".zip"


def office_document(up: Upload) -> bool:
    """A .docx, .xlsx or .odt: a ZIP by content, told apart by its directory alone (nothing is unpacked)."""
    try:
        with zipfile.ZipFile(io.BytesIO(up.data)) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError):
        return False
    return bool(names & OFFICE_MARKERS)


# what an OOXML (.docx, .xlsx) or OpenDocument (.odt) archive always holds at its root
OFFICE_MARKERS = {"[Content_Types].xml", "mimetype"}
OFFICE_DOCUMENT = "an office document, not an image or a ZIP of images"


# A ZIP bomb (a few MB of zeros that unpack to gigabytes) is refused from its directory before anything is
# unpacked, and the unpacking itself counts what it really reads: the directory's sizes can lie.
MAX_ZIP_RATIO = 200  # uncompressed / compressed per member; X-ray JPEGs, PNGs and DICOMs are far below


def _read_member(zf: zipfile.ZipFile, m: zipfile.ZipInfo, budget: int, limit: int) -> bytes:
    """A member's bytes, stopping as soon as it passes its own limit or the archive's remaining budget."""
    cap = min(limit, budget)
    out = bytearray()
    with zf.open(m) as fh:
        while chunk := fh.read(1 << 20):
            out += chunk
            if len(out) > cap:
                raise UploadError("zip_bomb" if len(out) > budget else "file_too_large",
                                  f"{m.filename} unpacks to more than {cap // (1024 * 1024)} MB", 413)
    return bytes(out)


def expand_uploads(uploads: list[Upload], settings: Settings) -> list[Upload]:
    """Unpack ZIP archives within a budget: member count, each member's size and compression ratio, and the
    archive's total unpacked bytes (``max_zip_total_mb``). Whether a file is a ZIP, an image or neither is decided
    by its content; the name is only a hint. CPU and memory bound: call it off the event loop."""
    out: list[Upload] = []
    limit = settings.max_upload_mb * 1024 * 1024
    total = settings.max_zip_total_mb * 1024 * 1024
    for up in uploads:
        if not is_zip(up):
            out.append(up)  # decoded (or refused) by content when its case is made
            continue
        try:
            with zipfile.ZipFile(io.BytesIO(up.data)) as zf:
                names = set(zf.namelist())
                if names & OFFICE_MARKERS:
                    raise UploadError("unsupported_type", f"{up.filename}: {OFFICE_DOCUMENT}", 415)
                members = [m for m in zf.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX")
                           and not Path(m.filename).name.startswith(".")]
                if len(members) > settings.max_zip_files:
                    raise UploadError("zip_error", f"the ZIP holds {len(members)} files; the limit is {settings.max_zip_files}", 413)
                declared = sum(m.file_size for m in members)
                if declared > total:
                    raise UploadError("zip_bomb", f"{up.filename} unpacks to {declared // (1024 * 1024)} MB; the limit is "
                                                  f"{settings.max_zip_total_mb} MB", 413)
                for m in members:
                    if m.file_size > limit:
                        raise UploadError("file_too_large", f"{m.filename} is too large", 413)
                    if m.file_size > MAX_ZIP_RATIO * max(m.compress_size, 1) and m.file_size > 1024 * 1024:
                        raise UploadError("zip_bomb", f"{m.filename} is compressed {m.file_size // max(m.compress_size, 1)}"
                                                      f" to 1: not an image", 413)
                budget = total
                for m in members:
                    data = _read_member(zf, m, budget, limit)
                    budget -= len(data)
                    out.append(Upload(Path(m.filename).name, data))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error) as exc:
            raise UploadError("zip_error", f"{up.filename}: not a readable ZIP file ({exc})", 400) from exc
    if not out:
        raise UploadError("no_file", "no file was uploaded", 400)
    return out


def preview_path(settings: Settings, case: Case) -> Path | None:
    """The case's preview PNG, made on first view (most API uploads are never viewed)."""
    if not case.image_path:
        return None
    path = settings.upload_dir / (Path(case.image_path).with_suffix("").name + ".preview.png")
    if not path.is_file():
        stored = settings.upload_dir / case.image_path
        if not stored.is_file():
            return None
        try:
            _save_preview(decode(stored), path)
        except Refusal:
            return None
    return path


def _save_preview(image: DecodedImage, path: Path) -> None:
    """What the user uploaded, as it came: in colour when it is a colour picture."""
    if image.pil is not None and image.colorfulness > 0.02:
        pil = image.pil.convert("RGB")
    else:
        pil = Image.fromarray((image.gray * 255).clip(0, 255).astype("uint8"))
    pil.thumbnail((1024, 1024))
    pil.save(path, format="PNG", compress_level=1)


MAX_PATIENT_CODE = 64


def check_patient_codes(*codes: str) -> None:
    """A patient code longer than the database keeps is refused, not cut: a cut code could name another patient."""
    for code in codes:
        if len((code or "").strip()) > MAX_PATIENT_CODE:
            raise UploadError("patient_code_too_long", f"the patient code has {len(code.strip())} characters; "
                                                       f"the limit is {MAX_PATIENT_CODE}", 422)


# a new case's columns without a default (its result, the model, ...): NULL until an answer is written
_NULL_AT_INSERT = tuple(a.key for a in sa_inspect(Case).column_attrs
                        if a.columns[0].default is None and not a.columns[0].primary_key)


def give_unset_columns(case: Case) -> None:
    """A new case's columns without a default, given None rather than left for the INSERT to fill: the reply reads
    them without a query."""
    for attr in _NULL_AT_INSERT:
        if attr not in case.__dict__:
            setattr(case, attr, None)


@dataclass
class Fresh:
    """What create_case knows of a case it has just stored, handed to its first analysis: the pixels decoded
    moments ago and the stored file's bytes (neither decoded nor read again), and that the case has no answer or
    heatmap yet and its first try is already counted."""

    image: DecodedImage
    data: bytes


def create_case(db: Session, settings: Settings, user: User, upload: Upload,
                patient_code: str) -> tuple[Case, Fresh | None]:
    """Store the upload de-identified (or nothing of it) and a pending case.

    The type is read from the content; DICOM goes through the PS3.15 profile,
    other images are kept as a metadata-free PNG of their pixels. What cannot be
    decoded or de-identified is refused and not written anywhere; the original
    file name is not kept (the stored file has a random name, the case is shown as case-ID).
    Returns the case and, unless it was refused, what its first analysis needs (``classify_case(..., fresh=)``);
    such a case is claimed for that analysis (the resumer leaves it alone).
    """
    check_patient_codes(patient_code)
    patient_code = (patient_code or "").strip()
    # decode, de-identify and write the file before touching the database: SQLite takes its one write lock at the
    # first INSERT and holds it to the commit, and every other upload's writer sleeps (1, 2, 5 ... 100 ms) meanwhile
    refusal = stored = image = path = None
    try:
        if len(upload.data) > settings.max_upload_mb * 1024 * 1024:
            raise Refusal("file_too_large")
        with stage("decode"):
            image = decode(upload.data)
        with stage("deidentify"):
            stored = deidentify.for_storage(image, patient_code, settings.deid_key, upload.data)
    except Refusal as r:
        refusal = r
    image_stats = None
    if stored is not None:
        # a random final name, written before the row: nothing to rename under the write lock, nothing to undo if
        # the writer has to try the row again
        path = settings.upload_dir / f"{uuid.uuid4().hex}{stored.ext}"
        with stage("store"):
            path.write_bytes(stored.data)
        with stage("statistics"):  # for drift checks; milliseconds on a large film: not under the write lock
            image_stats = drift.image_statistics(image.gray)

    def insert(wdb: Session) -> Case:
        # attempts=1: analyse_upload tries it at once, and counting that try here spares a write transaction
        case = Case(patient_code=patient_code, created_by=user.id, filename="", uncertain=False,
                    image_path=path.name if path is not None else "", image_stats=image_stats)
        if refusal is not None:
            case.status, case.refusal_code, case.refusal_message = "refused", refusal.code, refusal.message
        else:
            case.status, case.job_id, case.attempts, case.claimed_at = "pending", uuid.uuid4().hex, 1, utcnow()
        give_unset_columns(case)
        wdb.add(case)
        wdb.flush()  # the id names the case for people: case-12.png
        case.filename = f"case-{case.id}{stored.ext if stored is not None else ''}"
        detail = {"refused": refusal.code} if refusal is not None else {"format": stored.format}
        wdb.add(AuditLog(user_id=user.id, action="upload", case_id=case.id, detail={**detail, "bytes": len(upload.data)}))
        return case

    try:
        with stage("database"):
            case = db.merge(writer.write(db, insert), load=False)  # adopted from the writer's session: no query
            db.commit()  # nothing to write: ends the session's transaction, so classify_case needs no hop to commit
    except BaseException:
        if path is not None:
            path.unlink(missing_ok=True)  # no case names it: nothing of the upload stays
        raise
    _as_inserted(case, user)
    if refusal is not None:
        return case, None
    _in_flight.add(case.id)  # analyse_upload runs it next: not the resumer's
    return case, Fresh(image, stored.data)


def _as_inserted(case: Case, user: User) -> None:
    """What the reply reads (case_dict, on the event loop, where a query would block every other request), known
    without a query for a case this moment inserted: its creator, and no reviews yet."""
    set_committed_value(case, "creator", user)
    set_committed_value(case, "reviews", [])


async def classify_case(db: Session, settings: Settings, router: ModelRouter, case: Case, user: User | None,
                        fresh: Fresh | None = None) -> Case:
    """Run the model on a stored case; a missing or saturated model leaves it pending, nothing lost.

    The case waits for a job id (set when it is stored, renewed once an answer
    has been written); the answer is written only while the case still waits
    for that job, so a job answered twice (redelivered by the broker) changes
    the case once. The database and file work runs off the event loop, and no
    database connection is held while the model works (a burst of uploads would
    otherwise exhaust the pool). ``user`` None: the resumer, not a person. ``fresh``: from create_case, for the
    case it has just stored (and claimed).
    """
    if not case.image_path:
        return case
    if fresh is None and case.id in _in_flight:  # already being analysed here (a Retry clicked twice): one run is enough
        return case
    _in_flight.add(case.id)
    try:
        return await _classify(db, settings, router, case, user, fresh)
    finally:
        _in_flight.discard(case.id)


# ids of the cases this process is analysing now: the resumer leaves them alone. It once took them for cases a crash
# had left pending and sent each again under the same job id, so the first request's wait for its answer was
# replaced by the resumer's and ran out (60 s) while the model server did the work twice (bench_load broker1).
_in_flight: set[int] = set()


async def _classify(db: Session, settings: Settings, router: ModelRouter, case: Case, user: User | None,
                    fresh: Fresh | None) -> Case:
    if fresh is not None:
        data, decoded = fresh.data, fresh.image  # the stored file's bytes and the same pixels, decoded moments ago
    else:
        data, decoded = await run_in_threadpool((settings.upload_dir / case.image_path).read_bytes), None
        case.attempts = (case.attempts or 0) + 1  # a fresh case's first try was counted (and claimed) at its INSERT
        case.claimed_at = utcnow()
    if case.job_id is None:  # a retry of an answered case: a new attempt
        case.job_id = uuid.uuid4().hex
    case_id = case.id
    if db.dirty or db.in_transaction():  # a fresh upload's session has nothing open: no hop to a thread for nothing
        await run_in_threadpool(db.commit)  # ends the transaction: the connection goes back to the pool
    job = Job(case.job_id, case_id, user.id if user is not None else None)
    try:
        outcome = await router.predict(data, case.filename, job, decoded=decoded)
    except ModelUnavailable:
        return await run_in_threadpool(_mark_pending, db, case, job.id, "model_unavailable")
    except Saturated:
        return await run_in_threadpool(_mark_pending, db, case, job.id, "busy")
    except JobPending:
        return await run_in_threadpool(_mark_pending, db, case, job.id, "queued")

    def write() -> Case:
        with stage("database"):  # the heatmap's file write included: a few hundred microseconds
            # a broker's answer is in the case already (its result writer): read it, do not write it twice
            if outcome.written or not apply_outcome(db, settings, job, outcome, case=case,
                                                    previous=_UNKNOWN if fresh is None else None):
                db.refresh(case)  # that answer, or someone else's that landed first: show it
            # loaded here, in this thread: the reply reads them on the event loop, where a query would block
            case.creator, case.reviews
        return case

    return await run_in_threadpool(write)


async def analyse_upload(db: Session, settings: Settings, router: ModelRouter, user: User, upload: Upload,
                         patient_code: str) -> Case:
    """One upload from any door (page, API, DICOM node): stored de-identified as a case, then classified unless it
    was refused. The batcher is told it is coming while it is still being stored."""
    with router.expecting():
        case, fresh = await run_in_threadpool(create_case, db, settings, user, upload, patient_code)
        try:
            if fresh is not None:
                case = await classify_case(db, settings, router, case, user, fresh)
        finally:
            _in_flight.discard(case.id)  # create_case claimed it; a cancelled request must not keep it from the resumer
    return case


MAX_ATTEMPTS = 6  # automatic tries of a pending case before it waits for a person's Retry
CLAIM_LEASE_S = 120.0  # an analysis ends (answer, or pending with a reason) within the model timeout: twice that


def resumable(db: Session, limit: int, lease_s: float = CLAIM_LEASE_S) -> list[Case]:
    """Pending cases the resumer may try again, claimed for it: with an image, fewer than MAX_ATTEMPTS tries, oldest
    first, and not being analysed, here (``_in_flight``) or on another web node sharing the database (claimed less
    than ``lease_s`` ago). The claim is one conditional UPDATE per case, so of two nodes' resumers only one gets it.
    A case left pending without a reason (its node was killed mid-analysis) is marked ``interrupted``."""
    stale = utcnow() - dt.timedelta(seconds=lease_s)
    free = or_(Case.claimed_at.is_(None), Case.claimed_at < stale)
    rows = db.scalars(select(Case).where(Case.status == "pending", Case.image_path != "",
                                         func.coalesce(Case.attempts, 0) < MAX_ATTEMPTS, free,
                                         Case.id.not_in(list(_in_flight)))
                      .order_by(Case.id).limit(limit)).all()
    now, taken = utcnow(), []
    for c in rows:
        if db.execute(update(Case).where(Case.id == c.id, Case.status == "pending", free)
                      .values(claimed_at=now).execution_options(synchronize_session=False)).rowcount != 1:
            continue  # another node's resumer claimed it between the SELECT and here
        c.claimed_at = now
        if not c.refusal_code:
            c.refusal_code, c.refusal_message = "interrupted", Refusal("interrupted").message
        taken.append(c)
    db.commit()
    return taken


def release_claims(db: Session, cases: list[Case]) -> None:
    """Claims the resumer took but did not use (the model filled up): free at once, not after the lease."""
    if cases:
        db.execute(update(Case).where(Case.id.in_([c.id for c in cases]), Case.status == "pending")
                   .values(claimed_at=None).execution_options(synchronize_session=False))
        db.commit()


async def resume_pending(SessionLocal, settings: Settings, router: ModelRouter, interval_s: float = 5.0,
                         batch: int = 8) -> None:
    """Forever: when a model can take work, analyse waiting cases again (a model server that reconnects, a burst
    that has passed, a restart after a crash). Bounded: MAX_ATTEMPTS per case, ``batch`` at a time."""
    while True:
        await asyncio.sleep(interval_s)
        if not router.available or router.saturated:
            continue
        try:
            with SessionLocal() as db:
                cases = await run_in_threadpool(resumable, db, batch, 2 * settings.uplink_timeout_s)
                for i, case in enumerate(cases):
                    if router.saturated:
                        await run_in_threadpool(release_claims, db, cases[i:])
                        break
                    await classify_case(db, settings, router, case, None)
        except asyncio.CancelledError:
            raise
        except Exception:  # the next round tries again; never let the resumer die
            log.exception("resuming pending cases failed")


def _mark_pending(db: Session, case: Case, job_id: str, code: str) -> Case:
    # conditional: the result may have landed meanwhile (a late broker answer)
    db.execute(update(Case).where(Case.id == case.id, Case.job_id == job_id)  # the attempt ended: free to resume
               .values(status="pending", refusal_code=code, refusal_message=Refusal(code).message, claimed_at=None))
    db.commit()
    db.refresh(case)
    return case


_UNKNOWN = object()


def apply_outcome(db: Session, settings: Settings, job: Job, outcome: Outcome, case: Case | None = None,
                  previous=_UNKNOWN) -> bool:
    """Write a model's answer into its case, once: False if the case no longer
    waits for this job (already written, or a newer attempt started).

    ``case``: the session's object of that case, given the written values without a query (a refresh would read
    back what this function just wrote). ``previous``: its heatmap file before this answer, when the caller knows
    it (a case inserted moments ago has none); otherwise it is read."""
    r = outcome.result
    values = {"model_name": r.get("model"), "model_version": r.get("version"), "served_by": outcome.served_by,
              "elapsed_ms": r.get("elapsed_ms"), "job_id": None}
    if r.get("refused"):
        values.update(status="refused", refusal_code=(r.get("refusal") or {}).get("code"),
                      refusal_message=(r.get("refusal") or {}).get("message"), label=None, probabilities=None, risk=None,
                      needs_read=None, triage_threshold=None)
    else:
        # this site's calibration of that model, if an admin applied one; the model's own answer is kept beside it
        cal = active_calibration(db, model_key(r.get("model"), r.get("version")))
        shown, uncertain = apply_calibration(r["probabilities"], cal)
        # risk for the worklist: probability of anything but normal
        values.update(status="done", refusal_code=None, refusal_message=None, label=r["label"],
                      probabilities=shown, uncertain=bool(r.get("uncertain")) if uncertain is None else uncertain,
                      model_probabilities=r["probabilities"], calibration_version=cal.version if cal else None,
                      risk=1.0 - float(shown.get("normal", 0.0)),
                      # the model's triage on its own probabilities and card threshold (None from older servers)
                      needs_read=(r.get("triage") or {}).get("needs_read"),
                      triage_threshold=(r.get("triage") or {}).get("threshold"))
        if outcome.heatmap_png:
            hp = f"{job.case_id}-{job.id[:12]}.heatmap.png"  # a repeated answer rewrites the same file
            (settings.upload_dir / hp).write_bytes(outcome.heatmap_png)
            values["heatmap_path"] = hp
        elif outcome.heatmap_map is not None:  # drawn on first view (heatmap_png)
            hp = f"{job.case_id}-{job.id[:12]}.heatmap.json"
            gradcam.save_map(settings.upload_dir / hp, *outcome.heatmap_map)
            values["heatmap_path"] = hp
    if "heatmap_path" not in values:
        values["heatmap_path"] = None  # a refusal or an answer without one: no earlier heatmap stays on the case

    def store(wdb: Session) -> tuple[bool, str | None]:
        before = wdb.scalar(select(Case.heatmap_path).where(Case.id == job.case_id)) if previous is _UNKNOWN else previous
        # synchronize_session=False: no session object is matched against the criteria in Python under the lock
        done = wdb.execute(update(Case).where(Case.id == job.case_id, Case.job_id == job.id).values(**values)
                           .execution_options(synchronize_session=False)).rowcount == 1
        if not done:
            # another answer landed first; if it was this job's (a broker's result writer and the waiting request
            # both write it), the row names the very file written above, which must stay
            return False, wdb.scalar(select(Case.heatmap_path).where(Case.id == job.case_id))
        wdb.add(AuditLog(user_id=job.user_id or None, action="classify", case_id=job.case_id,
                         detail={"status": values["status"], "label": values.get("label"), "model": values["model_name"],
                                 "version": values["model_version"], "served_by": outcome.served_by, "job": job.id}))
        return True, before

    written, was = writer.write(db, store)
    # after the commit, the file no row names any more: a retry's replaced heatmap, or an answer nobody waits for
    # (``was``: before this write, or, when it was not written, what the row names now)
    stale = (was if written else values["heatmap_path"]) if was != values["heatmap_path"] else None
    if written and case is not None:
        for key, value in values.items():
            set_committed_value(case, key, value)
    if stale:
        (settings.upload_dir / stale).unlink(missing_ok=True)
        (settings.upload_dir / stale).with_suffix(".png").unlink(missing_ok=True)  # a kept map's drawn picture
    return written


def heatmap_png(settings: Settings, case: Case) -> Path | None:
    """The case's heatmap picture: stored as drawn by a model server, or drawn from the kept class map over the
    stored image on first view (and kept)."""
    if not case.heatmap_path:
        return None
    path = settings.upload_dir / case.heatmap_path
    if path.suffix == ".png":
        return path if path.is_file() else None
    png = path.with_suffix(".png")
    if not png.is_file():
        if not path.is_file() or not case.image_path:
            return None
        try:
            data = gradcam.render(path, decode(settings.upload_dir / case.image_path).gray)
        except (ValueError, OSError, Refusal):
            return None
        tmp = png.with_name(f"{png.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        tmp.replace(png)  # two first views at once: each writes a file of its own whole, the last one stays
    return png


def result_writer(SessionLocal, settings: Settings):
    """What the broker client calls for each result: write it into its case."""

    def write(job_id: str, body: dict, headers: dict) -> None:
        if body.get("error"):
            return  # the waiting request serves it another way; a late error changes nothing
        job = Job(job_id, int(headers.get("case_id") or 0), int(headers.get("user_id") or 0) or None)
        with SessionLocal() as db:
            apply_outcome(db, settings, job, Outcome.from_reply(body, f"broker:{body.get('served_by', '')}"))

    return write


def case_dict(case: Case) -> dict:
    return {
        "id": case.id,
        "patient_code": case.patient_code,
        "created_at": case.created_at.isoformat() + "Z",
        "filename": case.filename,
        "status": case.status,
        "label": case.label,
        "probabilities": case.probabilities,
        "uncertain": case.uncertain,
        "margin": None if not case.probabilities else round(margin(list(case.probabilities.values())), 4),
        "refused": case.status == "refused",
        "refusal": {"code": case.refusal_code, "message": case.refusal_message} if case.refusal_code else None,
        "risk": case.risk,
        "triage": None if case.triage_flag is None else {
            "needs_read": case.triage_flag, "score": case.risk, "threshold": case.triage_threshold,
            "rule": "model card threshold on 1 - p(normal)" if case.triage_threshold is not None else "most probable class"},
        "model": case.model_name,
        "model_version": case.model_version,
        "served_by": case.served_by,
        "created_by": case.creator.email if case.creator else None,
        "calibration_version": case.calibration_version,
        "review": review_dict(case.reviews[0]) if case.reviews else None,
    }


CSV_FIELDS = ["id", "patient_code", "created_at", "filename", "status", "needs_read", "label", "uncertain", "risk",
              *(f"p_{c}" for c in CLASSES), "refusal_code", "model", "model_version", "created_by",
              "reading", "agrees", "reviewer"]


def export_csv(cases) -> str:
    rows = []
    for c in cases:
        d = case_dict(c)
        probs = c.probabilities or {}
        d.update({f"p_{k}": f"{v:.4f}" for k, v in probs.items()})
        d["refusal_code"] = c.refusal_code
        d["risk"] = "" if c.risk is None else f"{c.risk:.4f}"
        d["needs_read"] = "" if c.triage_flag is None else ("yes" if c.triage_flag else "no")
        if d["review"]:
            d.update(reading=d["review"]["reading"], agrees=d["review"]["agrees"], reviewer=d["review"]["reviewer"])
        rows.append(d)
    return to_csv(CSV_FIELDS, rows)


def scrub_stored(db: Session, settings: Settings) -> dict:
    """De-identify again every upload stored by an older version (which kept
    DICOM attributes outside a short list, image metadata and file names).
    What can no longer be de-identified is deleted and its case marked refused."""
    counts = {"rewritten": 0, "deleted": 0}
    for case in db.scalars(select(Case).where(Case.image_path != "")).all():
        path = settings.upload_dir / case.image_path
        if not path.is_file():
            continue
        try:
            data = path.read_bytes()
            stored = deidentify.for_storage(decode(data), case.patient_code, settings.deid_key, data)
        except Refusal as r:
            path.unlink()
            case.image_path, case.status, case.refusal_code, case.refusal_message = "", "refused", r.code, r.message
            case.filename = f"case-{case.id}"
            counts["deleted"] += 1
            continue
        new = path.with_suffix(stored.ext)
        new.write_bytes(stored.data)
        if new != path:
            path.unlink()
        case.image_path, case.filename = new.name, f"case-{case.id}{stored.ext}"
        counts["rewritten"] += 1
    db.commit()
    return counts


def rotate_stored(settings: Settings, case: Case, turns: int = 1) -> None:
    """Turn the stored (de-identified) image ``turns`` quarters clockwise (1, 2 or 3), in place."""
    turns = int(turns) % 4
    if turns == 0:
        return
    path = settings.upload_dir / case.image_path
    if path.suffix == ".dcm":
        import numpy as np
        import pydicom

        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        arr = ds.pixel_array
        axes = (1, 2) if int(ds.get("NumberOfFrames", 1) or 1) > 1 else (0, 1)
        rot = np.ascontiguousarray(np.rot90(arr, -turns, axes=axes))
        ds.PixelData = rot.tobytes()
        if turns % 2:
            ds.Rows, ds.Columns = ds.Columns, ds.Rows
        ds.save_as(path, enforce_file_format=True)
    else:
        with Image.open(path) as img:
            img.load()
            turned = img.transpose({1: Image.Transpose.ROTATE_270, 2: Image.Transpose.ROTATE_180,
                                    3: Image.Transpose.ROTATE_90}[turns])
        # a stored JPEG becomes a lossless PNG of the turned pixels (turning it as a JPEG would re-compress it)
        new = path.with_suffix(".png")
        turned.save(new, format="PNG", compress_level=1)
        if new != path:
            path.unlink()
            case.image_path, case.filename = new.name, f"case-{case.id}.png"
    preview = settings.upload_dir / (Path(case.image_path).with_suffix("").name + ".preview.png")
    preview.unlink(missing_ok=True)  # made again on the next view
