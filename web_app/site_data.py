"""The clinic's reviewed cases as training data: a ZIP of the stored (de-identified) images and a
``model_training`` manifest whose labels are the doctors' readings, so that an operator can fine-tune on the
hospital's own images (``python -m model_training train --data site/manifest.csv+mix ...``)."""

from __future__ import annotations

import csv
import io
import re
import zipfile
from pathlib import Path

from fastapi import HTTPException, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from model_training.data.datasets import MANIFEST_FIELDS
from model_training.data.labels import CLASSES

from . import audit
from .config import Settings
from .db import Case, User
from .reviews import latest_reviews
from .security import can

LICENCE = "site data: the clinic's own images; not for redistribution"


def source_name(settings: Settings) -> str:
    """``site:<clinic>`` (a name without spaces), so the site is one source in per-source reports and LOSO."""
    clinic = re.sub(r"[^a-z0-9]+", "-", (settings.clinic_name or "").lower()).strip("-")
    return f"site:{clinic or 'clinic'}"


def export_zip(db: Session, settings: Settings) -> tuple[bytes, int]:
    """(ZIP bytes, number of cases): every analysed case whose newest reading is a class, with its image."""
    reviews = latest_reviews(db)
    source = source_name(settings)
    buf, rows = io.BytesIO(), []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # PNG and DICOM are compressed already
        for case in db.scalars(select(Case).where(Case.id.in_(list(reviews))).order_by(Case.id)):
            review = reviews[case.id]
            image = settings.upload_dir / case.image_path if case.image_path else None
            if review.reading not in CLASSES or image is None or not image.is_file():
                continue  # other findings and unassessable images are not a class to learn
            arcname = f"images/case-{case.id}{Path(case.image_path).suffix}"
            zf.write(image, arcname)
            rows.append({"path": arcname, "label": review.reading, "split": "", "source": source,
                         # the typed patient code keeps one patient's studies on one side of every split
                         "patient_id": case.patient_code or f"case-{case.id}", "subtype": "", "license": LICENCE,
                         "age_group": ""})
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=MANIFEST_FIELDS)
        w.writeheader()
        w.writerows(rows)
        zf.writestr("manifest.csv", text.getvalue())
    return buf.getvalue(), len(rows)


def export_response(request: Request, user: User, db: Session, **audit_detail) -> Response:
    """The reviewed cases as training data (web_app.site_data), for the page and the API."""
    if not can(user.role, "export"):
        raise HTTPException(403, "not allowed to export")
    data, n = export_zip(db, request.app.state.settings)
    audit.record(db, "export", user, request, kind="site_data", cases=n, **audit_detail)
    return Response(data, media_type="application/zip", headers={"Content-Disposition": 'attachment; filename="site-data.zip"'})
