"""The DICOM node against a real PACS: Orthanc (Debian's package) sends a chest film by C-STORE, the node analyses
it like an upload and sends a Secondary Capture and a Structured Report back into the same study; unknown callers,
a CT slice, a truncated instance and a PACS that is down, all with real DICOM networking (pynetdicom)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time

import httpx
import numpy as np
import pytest

from .test_imaging import make_dicom
from .webapp_helpers import free_port, live_app, new_token, sign_in, wait_until

pytest.importorskip("pynetdicom")
ORTHANC = shutil.which("Orthanc")
pytestmark = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc)")

PHI = {"PatientName": "Doe^Jane", "PatientID": "HOSP-123456", "PatientBirthDate": "19800101",
       "InstitutionName": "Hospital General", "AccessionNumber": "ACC-998877", "ReferringPhysicianName": "House^Gregory"}


def chest_dicom(path, **extra) -> bytes:
    from PIL import Image

    gray = np.asarray(Image.open(path).convert("L").resize((512, 512)))
    attrs = {"Modality": "CR", "BodyPartExamined": "CHEST", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1001",
             "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.1002", "StudyDate": "20261201", **PHI, **extra}
    return make_dicom(gray, **attrs)


class Orthanc:
    def __init__(self, tmp, node_port: int):
        self.http, self.dicom = free_port(), free_port()
        cfg = {"Name": "test-pacs", "StorageDirectory": str(tmp / "storage"), "IndexDirectory": str(tmp / "storage"),
               "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
               "AuthenticationEnabled": False, "DicomScuTimeout": 90, "DicomAlwaysAllowStore": True,
               "DicomModalities": {"cxr": ["CXRSCREEN", "127.0.0.1", node_port]}, "Plugins": []}
        (tmp / "orthanc.json").write_text(json.dumps(cfg))
        self.log = open(tmp / "orthanc.log", "w")
        self.proc = subprocess.Popen([ORTHANC, str(tmp / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.http}"
        assert wait_until(self._up, 30), (tmp / "orthanc.log").read_text()[-2000:]

    def _up(self) -> bool:
        try:
            return httpx.get(self.url + "/system", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)
        self.log.close()


@pytest.fixture()
def pacs_and_node(tmp_path, classifier):
    node_port = free_port()
    pacs = Orthanc(tmp_path, node_port)
    try:
        with live_app(tmp_path / "data", classifier=classifier, dicom_port=node_port, dicom_allowed="ORTHANC",
                      dicom_destination=f"ORTHANC@127.0.0.1:{pacs.dicom}", dicom_retry_s=0.2,
                      dicom_send_attempts=3) as (app, base):
            assert wait_until(lambda: app.state.dicom_node is not None, 10)
            yield pacs, app, base, node_port
    finally:
        pacs.stop()


def _cases(base, c, tok):
    return httpx.get(f"{base}/api/v1/cases", headers={"Authorization": f"Bearer {tok}"}).json()


def scu_store(port: int, dataset_bytes: bytes, calling: str = "ORTHANC"):
    """Send one instance with pynetdicom as a modality would; (association established, status or None)."""
    import io

    from pydicom import dcmread
    from pynetdicom import AE, StoragePresentationContexts

    ds = dcmread(io.BytesIO(dataset_bytes), force=True)
    ae = AE(ae_title=calling)
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRSCREEN")
    if not assoc.is_established:
        return False, None
    try:
        status = assoc.send_c_store(ds)
        return True, (int(status.Status) if status else None)
    finally:
        assoc.release()


def test_pacs_sends_a_film_and_gets_the_result_back_in_the_same_study(pacs_and_node, xray_paths):
    pacs, app, base, node_port = pacs_and_node
    c, csrf = sign_in(base)
    tok = new_token(c, csrf)
    film = chest_dicom(xray_paths["adult_normal"][0])
    r = httpx.post(pacs.url + "/instances", content=film)
    assert r.status_code == 200, r.text
    instance, study = r.json()["ID"], r.json()["ParentStudy"]
    # the PACS routes the study to our node, as an auto-routing rule would
    r = httpx.post(pacs.url + "/modalities/cxr/store", json={"Resources": [instance], "Synchronous": True}, timeout=120)
    assert r.status_code == 200, r.text
    cases = _cases(base, c, tok)
    assert len(cases) == 1 and cases[0]["status"] == "done" and cases[0]["patient_code"].startswith("DCM-")
    # the SC and the SR arrive in the original study
    assert wait_until(lambda: len(httpx.get(f"{pacs.url}/studies/{study}/instances").json()) == 3, 60)
    tags = {}
    for inst in httpx.get(f"{pacs.url}/studies/{study}/instances").json():
        t = httpx.get(f"{pacs.url}/instances/{inst['ID']}/simplified-tags").json()
        tags[t["Modality"]] = t
    assert set(tags) == {"CR", "OT", "SR"}
    for m in ("OT", "SR"):
        assert tags[m]["StudyInstanceUID"] == "1.2.826.0.1.3680043.8.498.1001" and tags[m]["PatientID"] == PHI["PatientID"]
    texts = [item["TextValue"] for item in tags["SR"]["ContentSequence"]]
    lead = "NEEDS A DOCTOR'S READ" if cases[0]["triage"]["needs_read"] else "No abnormality found by the model"
    assert texts[0] == lead and texts[1].startswith("Finding:") and "not a diagnosis" in texts[-1]
    assert tags["OT"]["BurnedInAnnotation"] == "YES"
    png = httpx.get(f"{pacs.url}/instances/{[i['ID'] for i in httpx.get(f'{pacs.url}/studies/{study}/instances').json() if httpx.get(pacs.url + '/instances/' + i['ID'] + '/simplified-tags').json()['Modality'] == 'OT'][0]}/preview")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    # nothing identifying reached our database or files
    data = app.state.settings.data_dir
    dump = "\n".join(sqlite3.connect(data / "app.db").iterdump())
    stored = b"".join(p.read_bytes() for p in (data / "uploads").iterdir())
    for value in [*PHI.values(), "1.2.826.0.1.3680043.8.498.1001"]:
        assert value not in dump and value.encode() not in stored, value
    admin = c.get("/admin").text
    assert "ORTHANC" in admin and 'data-testid="dicom-sends"' in admin and ">sent<" in admin


def test_unknown_callers_ct_slices_and_broken_instances(pacs_and_node, xray_paths):
    pacs, app, base, node_port = pacs_and_node
    c, csrf = sign_in(base)
    tok = new_token(c, csrf)
    film = chest_dicom(xray_paths["covid"][0])
    established, _ = scu_store(node_port, film, calling="STRANGER")
    assert not established and _cases(base, c, tok) == []
    assert "refused: unknown calling AE title" in c.get("/admin").text
    # a CT slice: acknowledged, listed as refused with the reason
    ok, status = scu_store(node_port, chest_dicom(xray_paths["covid"][0], Modality="CT"))
    assert ok and status == 0x0000
    cases = _cases(base, c, tok)
    assert len(cases) == 1 and cases[0]["status"] == "refused" and cases[0]["refusal"]["code"] == "not_xray_modality"
    ok, status = scu_store(node_port, chest_dicom(xray_paths["covid"][0], BodyPartExamined="HAND"))
    assert ok and status == 0x0000 and _cases(base, c, tok)[0]["refusal"]["code"] == "not_chest"
    # a truncated instance: failure status, nothing left behind
    import io

    from pydicom import dcmread

    ds = dcmread(io.BytesIO(chest_dicom(xray_paths["covid"][0])))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    files_before = set((app.state.settings.upload_dir).iterdir())
    ok, status = scu_store(node_port, buf.getvalue())
    assert ok and status == 0xC000
    assert len(_cases(base, c, tok)) == 2 and set(app.state.settings.upload_dir.iterdir()) == files_before


def test_pacs_down_when_sending_back_is_retried_then_shown_failed(pacs_and_node, xray_paths):
    pacs, app, base, node_port = pacs_and_node
    c, csrf = sign_in(base)
    tok = new_token(c, csrf)
    pacs.stop()
    ok, status = scu_store(node_port, chest_dicom(xray_paths["adult_normal"][1]))
    assert ok and status == 0x0000
    node = app.state.dicom_node
    assert wait_until(lambda: node.sends and node.sends[0].state == "failed", 30)
    assert node.sends[0].attempts == 3 and node.sends[0].last_error
    page = c.get("/admin").text
    assert ">failed<" in page
    case = _cases(base, c, tok)[0]
    assert case["status"] == "done" and c.get(f"/cases/{case['id']}").status_code == 200
    time.sleep(0.1)
