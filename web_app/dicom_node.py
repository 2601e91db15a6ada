"""A DICOM node: the X-ray unit or the PACS sends studies here (C-STORE), results go back into the same study.

Receiving (a Storage SCP, with C-ECHO) uses exactly the upload path: content checks, PS3.15 de-identification
before anything is written, the refusal gate, the model, a case in the worklist, the audit log. Unknown callers
(calling AE title, or host, not on the allow-list) are refused at association with a log line. An instance that
is not a frontal chest radiograph (CT, MR, a lateral view, another body part) is answered with success and listed
as a refused case with the reason; a broken one gets a failure status and leaves nothing behind. A case whose model
is down waits as pending and resumes like an upload.

Sending back, for each analysed study, to the configured destination (the PACS): a Secondary Capture image with the
heatmap and the result burnt in (with the decision-support line) and the result as a Basic Text Structured Report,
both in the original study. The original Study Instance UID and patient module exist only in memory, on the
outgoing objects: the store keeps de-identified data only (so a restart forgets what was still to be sent). A
destination that is down is retried with exponential backoff; the Admin page shows the node, the last associations
and every send with its state.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import hashlib
import hmac
import io
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from uplink_server import NOTICE
from uplink_server.errors import Refusal
from uplink_server.imaging import decode

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 Annex B): success, and "cannot understand" for an instance that cannot be read
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
# refusals that mean the instance itself is broken: failure status, nothing kept
BROKEN = {"corrupt_image", "invalid_dicom", "not_an_image", "empty_file", "unsupported_dicom", "deidentification_failed",
          "file_too_large", "too_many_pixels"}
NODE_USER = "dicom-node@localhost"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
# what the outgoing objects copy from the received instance so that the PACS files them in the original study
PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                     "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDescription")


@dataclass
class Peer:
    ae_title: str
    host: str
    port: int = 104

    @classmethod
    def parse(cls, text: str) -> "Peer":
        """``AET@host:port`` (port optional)."""
        aet, _, where = text.partition("@")
        host, _, port = where.partition(":")
        if not aet or not host:
            raise ValueError(f"a DICOM peer is AET@host[:port], got {text!r}")
        return cls(aet.strip(), host.strip(), int(port or 104))


def parse_allowed(text: str) -> list[tuple[str, str | None]]:
    """``AET`` or ``AET@host``, comma-separated: (AE title, host or None for any host)."""
    out = []
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        aet, _, host = item.partition("@")
        out.append((aet, host or None))
    return out


def pseudonym(patient_id: str, key: str) -> str:
    """The case's patient code for a received study: a keyed hash of the PatientID, so a patient's studies share a
    code at this site and the ID itself is never stored."""
    if not patient_id:
        return ""
    return "DCM-" + hmac.new(key.encode(), patient_id.encode(), hashlib.sha256).hexdigest()[:12]


@dataclass
class Send:
    case_id: int
    study_uid_hash: str  # shown on the page instead of the UID
    state: str = "waiting"  # waiting | sent | retrying | failed
    attempts: int = 0
    last_error: str = ""
    at: str = ""
    datasets: list = field(default_factory=list, repr=False)


class DicomNode:
    """The Storage SCP and the sender, on pynetdicom's threads; cases are classified on the app's event loop."""

    def __init__(self, settings, SessionLocal, router, loop: asyncio.AbstractEventLoop):
        self.settings, self.SessionLocal, self.router, self.loop = settings, SessionLocal, router, loop
        self.allowed = parse_allowed(settings.dicom_allowed)
        self.destination = Peer.parse(settings.dicom_destination) if settings.dicom_destination else None
        self.associations: collections.deque = collections.deque(maxlen=20)
        self.sends: collections.deque = collections.deque(maxlen=100)
        self.received = 0
        self._server = None
        self._outbox: "collections.deque[Send]" = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None

    # ---- receiving ----------------------------------------------------------------------------------------
    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.settings.dicom_ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.require_calling_aet = [aet for aet, _ in self.allowed] or ["NO-CALLER-ALLOWED"]
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_ACCEPTED, self._on_accepted)]
        self._server = ae.start_server(("0.0.0.0", self.settings.dicom_port), block=False, evt_handlers=handlers)
        self._sender = threading.Thread(target=self._send_loop, name="dicom-send", daemon=True)
        self._sender.start()
        print(f"DICOM node {self.settings.dicom_ae_title} listening on port {self.settings.dicom_port}; "
              f"callers allowed: {self.settings.dicom_allowed or 'none'}; results to: {self.settings.dicom_destination or 'nowhere'}",
              flush=True)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._server is not None:
            self._server.shutdown()

    def _caller(self, event) -> tuple[str, str]:
        req = event.assoc.requestor
        aet = req.ae_title.decode(errors="replace") if isinstance(req.ae_title, bytes) else str(req.ae_title)
        return aet.strip(), str(req.address)

    def _allowed(self, event) -> bool:
        aet, host = self._caller(event)
        return any(a == aet and (h is None or h == host) for a, h in self.allowed)

    def _note(self, event, outcome: str) -> None:
        aet, host = self._caller(event)
        self.associations.appendleft({"at": dt.datetime.utcnow().strftime("%Y-%m-%d %H:%M:%S"), "calling_ae": aet,
                                      "host": host, "outcome": outcome})

    def _on_rejected(self, event) -> None:
        aet, host = self._caller(event)
        log.warning("DICOM node: association from %s at %s refused (calling AE title not on the allow-list)", aet, host)
        print(f"DICOM node: refused association from {aet!r} at {host}: not on CXR_DICOM_ALLOWED", flush=True)
        self._note(event, "refused: unknown calling AE title")

    def _on_accepted(self, event) -> None:
        if not self._allowed(event):  # the AE title is known but the host is not: refuse it all the same
            aet, host = self._caller(event)
            log.warning("DICOM node: %s called from %s, which is not its allowed host; aborted", aet, host)
            self._note(event, "refused: host not allowed for this AE title")
            event.assoc.abort()
            return
        self._note(event, "accepted")

    def _on_echo(self, event) -> int:
        return SUCCESS if self._allowed(event) else CANNOT_UNDERSTAND

    def _on_store(self, event) -> int:
        """One received instance. Runs on pynetdicom's thread: the model work is handed to the app's loop."""
        if not self._allowed(event):
            return CANNOT_UNDERSTAND
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
        except Exception as exc:  # a dataset pydicom cannot even write back
            log.warning("DICOM node: unreadable instance (%s)", exc)
            return CANNOT_UNDERSTAND
        self.received += 1
        try:
            decode(data)
        except Refusal as r:
            if r.code in BROKEN:
                log.warning("DICOM node: broken instance refused (%s): %s", r.code, r.message)
                return CANNOT_UNDERSTAND
            # not a frontal chest radiograph: acknowledged, listed as refused with the reason
        # what the result needs to go back into the original study: held in memory only, never stored
        original = {k: ds.get(k) for k in PATIENT_AND_STUDY if k in ds}
        code = pseudonym(str(ds.get("PatientID", "") or ""), self.settings.deid_key)
        fut = asyncio.run_coroutine_threadsafe(self._analyse(data, code), self.loop)
        try:
            case_id, status, outcome = fut.result(timeout=self.settings.uplink_timeout_s + self.settings.queue_wait_s + 30)
        except Exception as exc:
            log.exception("DICOM node: could not store a received instance")
            return 0xA700 if "busy" in str(exc) else CANNOT_UNDERSTAND  # out of resources / cannot understand
        if status == "done" and self.destination is not None and original.get("StudyInstanceUID"):
            self.queue_results(case_id, original, outcome)
        return SUCCESS

    async def _analyse(self, data: bytes, patient_code: str):
        from starlette.concurrency import run_in_threadpool

        from .cases import Upload, analyse_upload, heatmap_png
        from .db import Case

        with self.SessionLocal() as db:
            user = await run_in_threadpool(node_user, db)
            case = await analyse_upload(db, self.settings, self.router, user, Upload("dicom-node.dcm", data), patient_code)
            case = db.get(Case, case.id)
            picture = await run_in_threadpool(heatmap_png, self.settings, case)  # sent back to the PACS: drawn now
            heatmap = picture.read_bytes() if picture is not None else None
            outcome = {"label": case.label, "probabilities": case.probabilities, "uncertain": case.uncertain,
                       "needs_read": case.triage_flag, "risk": case.risk, "model": case.model_name,
                       "version": case.model_version, "heatmap_png": heatmap}
            return case.id, case.status, outcome

    # ---- sending back -------------------------------------------------------------------------------------
    def queue_results(self, case_id: int, original: dict, outcome: dict) -> Send:
        send = Send(case_id, hashlib.sha256(str(original["StudyInstanceUID"]).encode()).hexdigest()[:10],
                    datasets=[secondary_capture(original, outcome), text_report(original, outcome)])
        self.sends.appendleft(send)
        self._outbox.append(send)
        self._wake.set()
        return send

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            now = time.monotonic()
            for send in list(self._outbox):
                if getattr(send, "_next", 0) > now:
                    continue
                self._try_send(send)
                if send.state in ("sent", "failed"):
                    self._outbox.remove(send)
                    send.datasets = []  # the original identifiers leave memory with the sent objects

    def _try_send(self, send: Send) -> None:
        from pynetdicom import AE

        send.attempts += 1
        send.at = dt.datetime.utcnow().strftime("%Y-%m-%d %H:%M:%S")
        dest = self.destination
        try:
            ae = AE(ae_title=self.settings.dicom_ae_title)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
            for sop in (SECONDARY_CAPTURE, BASIC_TEXT_SR):
                ae.add_requested_context(sop)
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
            if not assoc.is_established:
                raise ConnectionError(f"{dest.ae_title} at {dest.host}:{dest.port} did not accept the association")
            try:
                for ds in send.datasets:
                    status = assoc.send_c_store(ds)
                    if not status or int(status.Status) != SUCCESS:
                        raise ConnectionError(f"C-STORE status {hex(int(status.Status)) if status else 'none'}")
            finally:
                assoc.release()
            send.state, send.last_error = "sent", ""
        except Exception as exc:
            send.last_error = str(exc)
            if send.attempts >= self.settings.dicom_send_attempts:
                send.state = "failed"
                log.error("DICOM node: results of case %s not delivered after %d tries: %s", send.case_id, send.attempts, exc)
            else:
                send.state = "retrying"
                send._next = time.monotonic() + self.settings.dicom_retry_s * 2 ** (send.attempts - 1)

    def status(self) -> dict:
        return {"ae_title": self.settings.dicom_ae_title, "port": self.settings.dicom_port,
                "allowed": self.settings.dicom_allowed, "destination": self.settings.dicom_destination,
                "received": self.received, "associations": list(self.associations),
                "sends": [{k: getattr(s, k) for k in ("case_id", "study_uid_hash", "state", "attempts", "last_error", "at")}
                          for s in self.sends]}


def node_user(db):
    """The account that owns received studies (a technician: it uploads, it sees nothing)."""
    import secrets

    from sqlalchemy import select

    from .db import User
    from .security import hash_password

    user = db.scalar(select(User).where(User.email == NODE_USER))
    if user is None:
        user = User(email=NODE_USER, name="DICOM node", role="technician",
                    password_hash=hash_password(secrets.token_urlsafe(24)))
        db.add(user)
        db.commit()
    return user


# ---- the outgoing objects ----------------------------------------------------------------------------------

def result_lines(outcome: dict) -> list[str]:
    from model_training.data.labels import DISPLAY_NAMES

    name = lambda c: DISPLAY_NAMES.get(c, {}).get("en", c)  # noqa: E731
    lines = ["NEEDS A DOCTOR'S READ" if outcome.get("needs_read") else "No abnormality found by the model"]
    probs = outcome.get("probabilities") or {}
    lines.append(f"Finding: {name(outcome['label'])} {100 * probs.get(outcome['label'], 0):.0f}%"
                 + (" (uncertain)" if outcome.get("uncertain") else ""))
    lines.append("  ".join(f"{name(c)} {100 * p:.0f}%" for c, p in sorted(probs.items(), key=lambda kv: -kv[1])))
    lines.append(f"Model {outcome.get('model')} {outcome.get('version')}")
    lines.append(NOTICE)
    return lines


def _base(original: dict, sop_class: str, modality: str, series_number: int, description: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    for k, v in original.items():
        setattr(ds, k, v)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.SeriesDescription = description
    ds.Manufacturer = "cxr-screening (open source)"
    now = dt.datetime.now()
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    return ds


def secondary_capture(original: dict, outcome: dict):
    """The heatmap (or the film) with the result and the decision-support line burnt in, as an RGB Secondary Capture."""
    from PIL import Image, ImageDraw, ImageFont

    if outcome.get("heatmap_png"):
        img = Image.open(io.BytesIO(outcome["heatmap_png"])).convert("RGB")
    else:
        img = Image.new("RGB", (512, 512))
    w = max(512, img.width)
    img = img.resize((w, round(img.height * w / img.width)))
    lines = result_lines(outcome)
    font = ImageFont.load_default(size=max(12, w // 40))
    line_h = int(font.size * 1.4)
    canvas = Image.new("RGB", (w, img.height + line_h * (len(lines) + 1)), "black")
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines):
        colour = (255, 80, 80) if i == 0 and outcome.get("needs_read") else (255, 255, 255)
        draw.text((8, img.height + line_h // 2 + i * line_h), text, fill=colour, font=font)
    px = np.asarray(canvas, dtype=np.uint8)
    ds = _base(original, SECONDARY_CAPTURE, "OT", 9901, "AI screening result (decision support, not a diagnosis)")
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Rows, ds.Columns = px.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = px.tobytes()
    return ds


def text_report(original: dict, outcome: dict):
    """The result as a Basic Text SR: a titled container of text items a PACS viewer lists beside the film."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def code(value, scheme, meaning):
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
        return c

    def text(meaning, value):
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
        item.ConceptNameCodeSequence = Sequence([code("121071", "DCM", "Finding")])
        item.ConceptNameCodeSequence[0].CodeMeaning = meaning
        item.TextValue = value[:1024]
        return item

    ds = _base(original, BASIC_TEXT_SR, "SR", 9902, "AI screening report (decision support, not a diagnosis)")
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([code("18748-4", "LN", "Diagnostic imaging report")])
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    lines = result_lines(outcome)
    ds.ContentSequence = Sequence([text("Triage", lines[0]), text("Finding", lines[1]), text("Probabilities", lines[2]),
                                   text("Algorithm", lines[3]), text("Notice", lines[4])])
    return ds
