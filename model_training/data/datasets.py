"""Data specs -> manifests of labelled images.

A spec is one of: a regime name built from the shared data folder (``public``,
``adult``, ``mix``, ``covid``, ``radiography``), a CSV manifest (``path,label``
plus optional ``split,patient_id,source,subtype,license``), a Kaggle-style folder
``ROOT/{train,val,test}/CLASS/*`` or a plain folder ``ROOT/CLASS/*``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .labels import LabelError, canonical_label

if TYPE_CHECKING:
    import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}
SPLITS = ("train", "val", "test")

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """Where the shared data lives: $CXR_DATA_ROOT, else ../shared/data beside the repo."""
    env = os.environ.get("CXR_DATA_ROOT")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


# Regimes of the study, built from the shared data. public = Kermany (the
# study's public Kaggle set); adult = COVID collections + COVID-19 Radiography DB.
REGIMES = {
    "public": ["kermany"],
    "adult": ["covid", "radiography"],
    "mix": ["kermany", "covid", "radiography"],
    "covid": ["covid"],
    "radiography": ["radiography"],
    # adult pneumonia and normals from one hospital (NIH), tuberculosis and normals from one programme (Shenzhen)
    "nih": ["nih"],
    "tb": ["tb"],
    # everything: the 2.0.0 model's data (four classes, children and adults, seven hospitals)
    "all": ["kermany", "covid", "radiography", "nih", "tb"],
}

LICENCES = {
    "kermany": "CC BY 4.0",
    "radiography": "per source: NIH/RSNA (public, attribution requested), BIMCV-COVID19+ (CC BY 4.0), PadChest (CC BY-SA 4.0), others as in covid/",
    "nih": "NIH Clinical Center: unrestricted use with acknowledgement",
    "tb": "public (NLM); cite Jaeger et al., Quant Imaging Med Surg 2014",
}
AGE_GROUPS = {"kermany": "child", "covid": "adult", "radiography": "adult", "nih": "adult", "tb": "adult"}


class DataError(ValueError):
    """A data spec or manifest that cannot be used; the message says why."""


@dataclass
class Record:
    path: str  # absolute
    label: str  # canonical class
    split: str = ""  # "", train, val, test
    patient_id: str = ""
    source: str = ""
    subtype: str = ""
    license: str = ""
    age_group: str = ""

    def to_row(self) -> dict:
        return asdict(self)


MANIFEST_FIELDS = [f.name for f in fields(Record)]


def load_manifest(csv_path: Path, source_default: str = "", limit_to_existing: bool = False) -> list[Record]:
    """Read a CSV manifest; paths are relative to the CSV's folder."""
    csv_path = Path(csv_path)
    base = csv_path.parent
    records = []
    try:
        fh = open(csv_path, newline="", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read manifest {csv_path}: {exc}") from exc
    with fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        if not {"path", "label"} <= cols:
            raise DataError(f"{csv_path}: a manifest needs at least the columns path,label (found: {sorted(cols)})")
        for lineno, row in enumerate(reader, start=2):
            raw_path = (row.get("path") or "").strip()
            if not raw_path:
                raise DataError(f"{csv_path}:{lineno}: empty path")
            try:
                label = canonical_label(row.get("label", ""))
            except LabelError as exc:
                raise DataError(f"{csv_path}:{lineno}: {exc}") from None
            if label is None:
                continue
            split = (row.get("split") or "").strip().lower()
            if split and split not in SPLITS:
                raise DataError(f"{csv_path}:{lineno}: split must be one of {SPLITS}, got {split!r}")
            p = Path(raw_path)
            p = p if p.is_absolute() else base / p
            source = (row.get("source") or "").strip() or source_default
            records.append(
                Record(
                    path=str(p.resolve()),
                    label=label,
                    split=split,
                    patient_id=(row.get("patient_id") or "").strip(),
                    source=source,
                    subtype=(row.get("subtype") or "").strip(),
                    license=(row.get("license") or row.get("licence") or "").strip(),
                    age_group=(row.get("age_group") or "").strip(),
                )
            )
    return records


def _shared_collection(name: str) -> list[Record]:
    root = data_root() / name
    csv_path = root / "labels.csv"
    if not csv_path.exists():
        raise DataError(f"data regime needs {csv_path}, which does not exist (set CXR_DATA_ROOT to the data folder)")
    records = load_manifest(csv_path)
    for r in records:
        rel = Path(r.path).relative_to(root.resolve())
        if name == "covid":
            # the collection (ieee8023/hannover/figure1) is the folder; the csv's source is a URL-ish name
            r.source = f"covid/{rel.parts[0]}"
        else:
            r.source = name
        r.license = r.license or LICENCES.get(name, "")
        r.age_group = AGE_GROUPS[name]
        if r.patient_id:
            r.patient_id = f"{name}:{r.patient_id}"
    return records


def _folder(root: Path) -> list[Record]:
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    split_dirs = [s for s in SPLITS if s in subdirs]
    layout = [(s, subdirs[s]) for s in split_dirs] if split_dirs else [("", root)]
    records = []
    for split, sdir in layout:
        for cdir in sorted(p for p in sdir.iterdir() if p.is_dir()):
            try:
                label = canonical_label(cdir.name)
            except LabelError as exc:
                raise DataError(f"{cdir}: folder name is not a class: {exc}") from None
            if label is None:
                continue
            for f in sorted(cdir.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    records.append(Record(path=str(f.resolve()), label=label, split=split, source=root.name))
    if not records:
        raise DataError(f"{root}: no images found in ROOT/CLASS/* or ROOT/{{train,val,test}}/CLASS/*")
    return records


def load_spec(spec: str) -> list[Record]:
    """Resolve one spec or several separated by '+' or ',' into records."""
    parts = [s for s in spec.replace("+", ",").split(",") if s.strip()]
    if not parts:
        raise DataError("empty data spec")
    records: list[Record] = []
    for part in parts:
        part = part.strip()
        if part in REGIMES:
            for name in REGIMES[part]:
                records.extend(_shared_collection(name))
            continue
        p = Path(part)
        if p.is_file() and p.suffix.lower() == ".csv":
            records.extend(load_manifest(p, source_default=p.stem))
        elif p.is_dir():
            records.extend(_folder(p))
        else:
            raise DataError(
                f"data spec {part!r} is neither a regime ({', '.join(REGIMES)}), a CSV manifest nor a folder"
            )
    # one image listed twice (e.g. regimes overlapping) counts once
    unique = {r.path: r for r in records}
    return list(unique.values())


def check_files(records: list[Record]) -> None:
    missing = [r.path for r in records if not os.path.isfile(r.path)]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataError(f"{len(missing)} image file(s) listed but missing: {', '.join(missing[:5])}{more}")


def write_manifest(records: list[Record], path: Path) -> None:
    """Write records as a manifest; paths relative to its folder, so that the
    repository and the data can move together to another machine."""
    base = Path(path).resolve().parent
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        w.writeheader()
        for r in records:
            row = r.to_row()
            row["path"] = os.path.relpath(r.path, base)
            w.writerow(row)


def splits_beside(model_path: Path) -> Path | None:
    """The patient-level splits manifest saved with a model: ``<name>.splits.csv`` beside a shipped model,
    or ``splits.csv`` in its run folder; None when neither is there."""
    model_path = Path(model_path)
    stem = model_path.name.rsplit(".", 1)[0]
    return next((p for p in (model_path.with_name(stem + ".splits.csv"), model_path.parent / "splits.csv")
                 if p.is_file()), None)


def load_input(path: str, spec, augment=None) -> np.ndarray:
    """One image as the network gets it: the server's decoding and the one preprocess() (with ``augment`` in training)."""
    from uplink_server.errors import Refusal  # here, not at the top: reading a manifest needs no image stack
    from uplink_server.imaging import decode
    from uplink_server.preprocessing import preprocess

    try:
        gray = decode(path).gray
    except Refusal as exc:
        raise DataError(f"{path}: {exc.message}") from None
    return preprocess(gray, spec, augment)
