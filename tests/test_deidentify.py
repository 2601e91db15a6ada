"""No patient data is stored: DICOM PS3.15 Annex E at every depth, content-sniffed
types, metadata-free images, no original file names; bad files refused with a reason.

The corpus is made here with pydicom and Pillow: real X-ray pixels from
../shared/data with identifying values planted at several depths of DICOM
sequences, in private tags, without the 128-byte preamble, in EXIF and PNG text,
and in the upload's file name. Every file the web app keeps (database included)
is then searched byte-wise for every planted value.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from uplink_server import deidentify
from uplink_server.errors import Refusal
from uplink_server.imaging import decode

from .webapp_helpers import live_app, new_token, sign_in

# Every value planted below; none may appear in anything stored.
PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "HOSP-123456",
    "PatientBirthDate": "19620417",
    "PatientBirthName": "Smith^Janet",
    "PatientAge": "061Y",
    "PatientAddress": "Av. Daniel Leon Borja 42",
    "ResponsiblePerson": "Doe^Johnathan",
    "ImageComments": "Jane Doe bed 12 ward B",
    "InstitutionName": "Hospital General Riobamba",
    "InstitutionAddress": "Calle Espejo 1234",
    "ReferringPhysicianName": "House^Gregory",
    "OperatorsName": "Tech^Mariana",
    "StationName": "XRAYROOM3",
    "DeviceSerialNumber": "SN-998877665",
    "AccessionNumber": "ACC-77120315",
    "StudyDate": "20200315",
    "StudyID": "STUDY-5566",
    "StudyInstanceUID": "1.2.3.4.5.6.7.8.9.1001",
    "SeriesInstanceUID": "1.2.3.4.5.6.7.8.9.1002",
    "SOPInstanceUID": "1.2.3.4.5.6.7.8.9.1003",
    "nested_name": "Doe^Jane^Referenced",
    "nested_id": "REF-998877",
    "deep_name": "Deep^Nested^Person",
    "deep_id": "DEEP-4455",
    "inst_code": "HGR-7781",
    "private_top": "PRIVATE-Jane-Doe-555",
    "private_nested": "PRIVNEST-8899",
    "file_name": "Jane_Doe_1962",
    "exif": "Jane Doe 1962-04-17",
    "png_text": "Patient Juana Perez",
}


def phi_dataset(gray_u8: np.ndarray, **over):
    """A DX image with identifying values at the top level, one and three
    sequence levels down, and in private tags (top level and nested)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = PHI["SOPInstanceUID"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientBirthName", "PatientAge", "PatientAddress",
               "ResponsiblePerson", "ImageComments", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
               "OperatorsName", "StationName", "DeviceSerialNumber", "AccessionNumber", "StudyDate", "StudyID",
               "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, kw, PHI[kw])
    ref = Dataset()
    ref.PatientName, ref.PatientID = PHI["nested_name"], PHI["nested_id"]
    ref.ReferencedSOPInstanceUID = PHI["StudyInstanceUID"]
    ds.ReferencedPatientSequence = Sequence([ref])
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PHI["inst_code"], "L", PHI["InstitutionName"]
    ds.InstitutionCodeSequence = Sequence([code])
    # three levels down, inside sequences the profile does not list
    deep = Dataset()
    deep.PatientName, deep.PatientID = PHI["deep_name"], PHI["deep_id"]
    block = deep.private_block(0x0013, "ACME NESTED", create=True)
    block.add_new(0x01, "LO", PHI["private_nested"])
    mid = Dataset()
    mid.CodeValue, mid.CodingSchemeDesignator, mid.CodeMeaning = "T-D3000", "SRT", "Chest"
    mid.AnatomicRegionModifierSequence = Sequence([deep])
    top = Dataset()
    top.CodeValue, top.CodingSchemeDesignator, top.CodeMeaning = "T-D3000", "SRT", "Chest"
    top.PrimaryAnatomicStructureSequence = Sequence([mid])
    ds.AnatomicRegionSequence = Sequence([top])
    ds.private_block(0x0011, "ACME PHI", create=True).add_new(0x01, "LO", PHI["private_top"])
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    px = gray_u8.astype(np.uint16) * 16
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = px.tobytes()
    for k, v in over.items():
        setattr(ds, k, v)
    return ds


def dicom_bytes(ds, preamble: bool = True, meta: bool = True) -> bytes:
    buf = io.BytesIO()
    if preamble:
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset, write_file_meta_info

    fp = DicomFileLike(buf)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    if meta:
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)  # Part 10 content, no preamble or "DICM"
    write_dataset(fp, ds)
    data = buf.getvalue()
    assert data[128:132] != b"DICM"
    return data


@pytest.fixture(scope="module")
def gray(xray_paths) -> np.ndarray:
    return np.asarray(Image.open(xray_paths["adult_normal"][0]).convert("L"))


def planted_in(data: bytes) -> list[str]:
    return [k for k, v in PHI.items() if v.encode() in data]


# --- the profile on its own ----------------------------------------------------------

def test_profile_table_is_the_standard_one():
    prof = deidentify.profile()
    assert len(prof.exact) > 500  # the whole Annex E table, not an abridged list
    assert prof.exact[(0x0010, 0x0010)] == "Z"  # Patient's Name
    assert prof.exact[(0x0008, 0x1120)] == "X"  # Referenced Patient Sequence
    assert prof.exact[(0x0020, 0x000D)] == "U"  # Study Instance UID
    from pydicom.tag import Tag

    assert prof.action(Tag(0x6002, 0x3000)) == "X"  # Overlay Data, a repeating group


@pytest.mark.parametrize("preamble,meta", [(True, True), (False, True), (False, False)])
def test_every_planted_value_is_gone(gray, preamble, meta):
    import pydicom

    raw = dicom_bytes(phi_dataset(gray), preamble, meta)
    assert len(planted_in(raw)) >= 26  # the corpus really carries them
    image = decode(raw)  # by content: preamble or not
    assert image.format == "DICOM"
    out = deidentify.for_storage(image, "EC-0042", "site-key").data
    assert planted_in(out) == []
    ds = pydicom.dcmread(io.BytesIO(out))
    assert out[128:132] == b"DICM"  # stored as a proper Part 10 file
    assert str(ds.PatientName) == "EC-0042" and ds.PatientID == "EC-0042"
    assert ds.PatientIdentityRemoved == "YES" and "Annex E" in " ".join(ds.DeidentificationMethod)
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert not any(e.tag.is_private for e in ds.iterall())
    for kw in ("PatientBirthName", "PatientAge", "ImageComments", "InstitutionCodeSequence", "ReferencedPatientSequence",
               "ResponsiblePerson", "InstitutionName", "StationName", "DeviceSerialNumber"):
        assert kw not in ds  # X: removed
    assert ds.StudyDate == ds.AccessionNumber == ds.PatientBirthDate == ""  # Z: kept, empty
    deep = ds.AnatomicRegionSequence[0].PrimaryAnatomicStructureSequence[0].AnatomicRegionModifierSequence[0]
    assert str(deep.PatientName) == "" and deep.PatientID == "REMOVED"  # the profile applies three levels down
    assert ds.Modality == "DX" and ds.ViewPosition == "PA" and ds.BodyPartExamined == "CHEST"  # what reading needs
    assert np.array_equal(ds.pixel_array, gray.astype(np.uint16) * 16)
    assert np.allclose(decode(out).gray, image.gray)


def test_uids_are_replaced_consistently(gray):
    import pydicom

    def study_uid(key):
        out = deidentify.for_storage(decode(dicom_bytes(phi_dataset(gray))), "X", key).data
        ds = pydicom.dcmread(io.BytesIO(out))
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        return ds.StudyInstanceUID, ds.SOPInstanceUID

    a1, a2, b = study_uid("site-a"), study_uid("site-a"), study_uid("site-b")
    assert a1 == a2  # the same study stays one study at a site
    assert a1[0] != b[0] and a1[0] != PHI["StudyInstanceUID"] and a1[0].startswith("2.25.")


def test_burned_in_annotation_refused(gray):
    with pytest.raises(Refusal) as e:
        deidentify.for_storage(decode(dicom_bytes(phi_dataset(gray, BurnedInAnnotation="YES"))), "X", "k")
    assert e.value.code == "burned_in_annotation"


def test_images_lose_their_metadata(gray):
    exif = Image.Exif()
    exif[0x010E] = PHI["exif"]  # ImageDescription
    exif[0x013B] = PHI["exif"]  # Artist
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "JPEG", exif=exif, quality=95, comment=PHI["exif"].encode())
    jpeg = buf.getvalue()
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", PHI["png_text"])
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "PNG", pnginfo=info)
    png = buf.getvalue()
    for data, key in ((jpeg, "exif"), (png, "png_text")):
        assert PHI[key].encode() in data
        image = decode(data)
        for upload in (None, data):  # a re-encoded PNG of the pixels; the upload's own data, stripped
            out = deidentify.for_storage(image, "X", "k", upload)
            assert out.ext == ".png" and PHI[key].encode() not in out.data
            assert np.array_equal(decode(out.data).gray, image.gray)  # the model sees the same pixels
    # the PNG kept its own compressed pixels; EXIF or an animation take the re-encoding path
    assert deidentify.strip_png(png) is not None and png.index(b"IDAT") > 0
    for extra in (b"eXIf", b"acTL"):
        import zlib

        chunk = (4).to_bytes(4, "big") + extra + b"\0\0\0\0" + zlib.crc32(extra + b"\0\0\0\0").to_bytes(4, "big")
        assert deidentify.strip_png(png[:33] + chunk + png[33:]) is None
    assert deidentify.strip_png(png[:-20]) is None  # cut short


def test_a_jpeg_without_exif_is_kept_as_its_own_compressed_data_without_metadata(gray, xray_paths):
    """Real X-ray JPEGs, baseline and progressive, with a comment, XMP and an ICC profile planted: stored as the same
    compressed data (the same pixels, bit for bit, and no re-encoding), every planted value gone. One with EXIF
    takes the PNG path: its orientation has to be applied to the pixels."""
    planted = PHI["exif"].encode()
    for path in xray_paths["kermany_normal"][:2] + xray_paths["kermany_pneumonia"][:2]:
        original = path.read_bytes()
        out = deidentify.for_storage(decode(original), "X", "k", original)
        assert out.ext == ".jpg" and out.format == "JPEG" and len(out.data) <= len(original)
        assert np.array_equal(decode(out.data).gray, decode(original).gray)
    for progressive in (False, True):
        buf = io.BytesIO()
        Image.fromarray(gray).save(buf, "JPEG", quality=90, progressive=progressive, comment=planted,
                                   icc_profile=b"ICC-" + planted, xmp=b"<x:xmpmeta>" + planted + b"</x:xmpmeta>")
        data = buf.getvalue() + b"trailing bytes after the end of image: " + planted
        assert data.count(planted) == 4
        image = decode(data)
        out = deidentify.for_storage(image, "X", "k", data)
        assert out.ext == ".jpg" and planted not in out.data and b"ICC-" not in out.data
        assert np.array_equal(decode(out.data).gray, image.gray)  # the model sees the same pixels
        # the compressed scan data is the upload's own
        scan = data[data.index(b"\xff\xda"):data.index(b"\xff\xd9")]
        assert scan in out.data
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": the stored pixels must be the turned ones
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "JPEG", exif=exif)
    image = decode(buf.getvalue())
    out = deidentify.for_storage(image, "X", "k", buf.getvalue())
    assert out.ext == ".png" and decode(out.data).gray.shape == image.gray.shape == gray.shape[::-1]
    assert deidentify.strip_jpeg(buf.getvalue()[:-200]) is None  # cut short: not taken


# --- refusals by content ----------------------------------------------------------------

def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (64, 64), 100).save(buf, "GIF")
    return buf.getvalue()


def test_bad_files_refused_with_reasons(gray):
    from pydicom.dataset import Dataset  # noqa: F401

    cases = {
        "unsupported_format": _gif(),
        "invalid_dicom": dicom_bytes(phi_dataset(gray, Rows=0, Columns=0)),
        "burned_in_annotation": dicom_bytes(phi_dataset(gray, BurnedInAnnotation="YES")),
    }
    palette = phi_dataset(gray)
    palette.PhotometricInterpretation = "PALETTE COLOR"
    palette.BitsAllocated, palette.BitsStored, palette.HighBit = 8, 8, 7
    palette.PixelData = gray.astype(np.uint8).tobytes()
    cases["invalid_dicom_palette"] = dicom_bytes(palette)
    for code, data in cases.items():
        with pytest.raises(Refusal) as e:
            deidentify.for_storage(decode(data), "X", "k")
        assert e.value.code == code.replace("_palette", ""), code
        assert e.value.message


# --- the web app: nothing identifying anywhere it writes -------------------------------

def test_web_app_stores_no_phi(tmp_path, classifier, gray):
    import pydicom

    with live_app(tmp_path / "d", classifier=classifier) as (app, base):
        c, csrf = sign_in(base)
        import httpx

        api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {new_token(c, csrf)}"}, timeout=60)
        exif = Image.Exif()
        exif[0x010E] = PHI["exif"]
        buf = io.BytesIO()
        Image.fromarray(gray).save(buf, "JPEG", exif=exif, quality=95)
        palette = phi_dataset(gray, PhotometricInterpretation="PALETTE COLOR", BitsAllocated=8, BitsStored=8, HighBit=7,
                              PixelData=gray.astype(np.uint8).tobytes())
        full = dicom_bytes(phi_dataset(gray))
        uploads = [  # (bytes, extension in the name, expected HTTP status, expected refusal code)
            (full, ".dcm", 200, None),
            (dicom_bytes(phi_dataset(gray), preamble=False), ".dcm", 200, None),
            (dicom_bytes(phi_dataset(gray), preamble=False, meta=False), "", 200, None),
            (buf.getvalue(), ".jpg", 200, None),
            (_gif(), ".jpg", 415, "unsupported_format"),  # a GIF renamed .jpg
            (dicom_bytes(phi_dataset(gray, Rows=0, Columns=0)), ".dcm", 422, "invalid_dicom"),
            (dicom_bytes(palette), ".dcm", 422, "invalid_dicom"),
            (dicom_bytes(phi_dataset(gray, BurnedInAnnotation="YES")), ".dcm", 422, "burned_in_annotation"),
            (dicom_bytes(phi_dataset(gray), preamble=False)[:600], ".dcm", 415, "not_an_image"),  # cut inside the header
            (full[:len(full) // 2], ".dcm", 422, "corrupt_image"),
        ]
        for data, ext, status, code in uploads:
            r = api.post("/api/v1/predict", data={"patient_code": "EC-77"},
                         files={"file": (PHI["file_name"] + ext, data, "application/octet-stream")})
            assert r.status_code == status, (ext, code, r.text[:300])
            body = r.json()
            assert body["filename"] == f"case-{body['case_id']}" + (".dcm" if status == 200 and ext != ".jpg" else ".png" if status == 200 else "")
            if code:
                assert body["refusal"]["code"] == code and body["refusal"]["message"]
            else:
                assert body["label"] and body["patient_code"] == "EC-77"
        # and through the upload page, as a ZIP
        zbuf = io.BytesIO()
        import zipfile

        with zipfile.ZipFile(zbuf, "w") as zf:
            zf.writestr(PHI["file_name"] + "/" + PHI["file_name"] + ".dcm", full)
        r = c.post("/upload", data={"csrf_token": csrf, "patient_code": "EC-78"},
                   files=[("files", (PHI["file_name"] + ".zip", zbuf.getvalue(), "application/zip"))])
        assert r.status_code == 200
        assert c.get(str(r.url) + "/image.png").headers["content-type"] == "image/png"  # the preview, made on first view
        data_dir = app.state.settings.data_dir
        running = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}  # with SQLite's write-ahead log
    stored = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".dcm" for p in stored) and any(p.name == "app.db" for p in stored)
    assert any(p.name.endswith("-wal") for p in running)
    leaks = {str(p.relative_to(tmp_path)): planted_in(p.read_bytes()) for p in stored}
    leaks.update({str(p.relative_to(tmp_path)) + " (running)": planted_in(d) for p, d in running.items()})
    assert all(not v for v in leaks.values()), leaks
    for p in stored:
        if p.suffix == ".dcm":
            assert pydicom.dcmread(p).PatientIdentityRemoved == "YES"
    # refused uploads left nothing on disk: 4 + 1 (ZIP) images (previews are made on first view)
    assert len([p for p in stored if p.parent.name == "uploads" and ".preview" not in p.name and ".heatmap" not in p.name]) == 5
    assert len([p for p in stored if ".preview" in p.name]) == 1


def test_scrub_cleans_uploads_stored_by_older_versions(tmp_path, gray):
    """`python -m web_app scrub` on a data folder where an old version kept a raw DICOM
    and a JPEG with EXIF, and an unreadable file."""
    from web_app.cli import main
    from web_app.config import Settings
    from web_app.db import Case, User, make_engine, migrate, session_factory

    settings = Settings.from_env(tmp_path / "d")
    migrate(settings.database_url)
    exif = Image.Exif()
    exif[0x010E] = PHI["exif"]
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "JPEG", exif=exif)
    old = {"a.dcm": dicom_bytes(phi_dataset(gray), preamble=False), "b.jpg": buf.getvalue(),
           "c.dcm": dicom_bytes(phi_dataset(gray))[:3000]}
    with session_factory(make_engine(settings.database_url))() as db:
        db.add(User(id=1, email="a@b", password_hash="x", role="admin"))
        for name, data in old.items():
            (settings.upload_dir / name).write_bytes(data)
            db.add(Case(patient_code="EC-1", created_by=1, filename=PHI["file_name"], image_path=name, status="done"))
        db.commit()
    assert main(["scrub", "--data-dir", str(tmp_path / "d")]) == 0
    files = [p for p in settings.upload_dir.iterdir()]
    assert sorted(p.name for p in files) == ["a.dcm", "b.png"]
    assert all(planted_in(p.read_bytes()) == [] for p in files)
    with session_factory(make_engine(settings.database_url))() as db:
        cases = db.query(Case).order_by(Case.id).all()
        assert [c.status for c in cases] == ["done", "done", "refused"] and cases[2].image_path == ""
        assert all(PHI["file_name"] not in c.filename for c in cases[:2])
