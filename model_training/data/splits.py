"""Patient-level, class-stratified, seeded splits and near-duplicate checks."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from .datasets import Record


class SplitError(ValueError):
    pass


def group_key(r: Record) -> str:
    """Images of one patient share a key; images without a patient id stand alone."""
    return f"{r.source}|{r.patient_id}" if r.patient_id else f"image|{r.path}"


def _assign(groups: dict[str, list[Record]], fractions: dict[str, float], rng: random.Random) -> dict[str, str]:
    """Assign whole groups to splits, stratified by each group's majority label."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for key, recs in groups.items():
        label = Counter(r.label for r in recs).most_common(1)[0][0]
        by_label[label].append(key)
    out = {}
    for label in sorted(by_label):
        keys = sorted(by_label[label])
        rng.shuffle(keys)
        n_images = sum(len(groups[k]) for k in keys)
        targets = {s: f * n_images for s, f in fractions.items()}
        filled = {s: 0 for s in fractions}
        for k in keys:
            # give the group to the split that is furthest below its target share
            s = max(fractions, key=lambda s: (targets[s] - filled[s]) / max(targets[s], 1e-9))
            out[k] = s
            filled[s] += len(groups[k])
    return out


def make_splits(records: list[Record], val_frac: float = 0.1, test_frac: float = 0.15, seed: int = 0) -> list[Record]:
    """Fill in each record's split. Existing splits are kept: an official test
    set stays the test set, and validation is carved from official training data.

    Records are never moved across an existing split boundary; patients are
    never divided between splits.
    """
    rng = random.Random(seed)
    pre = defaultdict(list)
    for r in records:
        pre[r.split].append(r)
    # unsplit data: train/val/test
    if pre[""]:
        groups = defaultdict(list)
        for r in pre[""]:
            groups[group_key(r)].append(r)
        fr = {"train": 1 - val_frac - test_frac, "val": val_frac, "test": test_frac}
        fr = {k: v for k, v in fr.items() if v > 0}
        assign = _assign(groups, fr, rng)
        for k, recs in groups.items():
            for r in recs:
                r.split = assign[k]
    # official train without val: carve val by patient
    if pre["train"] and not pre["val"] and val_frac > 0:
        groups = defaultdict(list)
        for r in pre["train"]:
            groups[group_key(r)].append(r)
        assign = _assign(groups, {"train": 1 - val_frac, "val": val_frac}, rng)
        for k, recs in groups.items():
            for r in recs:
                r.split = assign[k]
    check_patient_disjoint(records)
    return records


def check_patient_disjoint(records: list[Record]) -> None:
    """Raise SplitError if a patient appears in more than one split.

    Kermany numbered its official train and test folders independently, so the
    same id across that official boundary is not the same child: those ids are
    namespaced by split before the check.
    """
    seen: dict[str, str] = {}
    for r in records:
        if not r.patient_id:
            continue
        key = group_key(r)
        if r.source == "kermany":
            key += "|" + ("test" if r.split == "test" else "trainval")
        other = seen.setdefault(key, r.split)
        if other != r.split:
            raise SplitError(f"patient {r.patient_id} ({r.source}) is in both {other} and {r.split}")


def limit_records(records: list[Record], limit: int, seed: int = 0) -> list[Record]:
    """Keep at most ``limit`` images per split (class-balanced, whole patients)."""
    rng = random.Random(seed)
    out = []
    by_split = defaultdict(list)
    for r in records:
        by_split[r.split].append(r)
    for split, recs in sorted(by_split.items()):
        by_label = defaultdict(list)
        for r in recs:
            by_label[r.label].append(r)
        per_label = max(1, limit // max(1, len(by_label)))
        for label in sorted(by_label):
            group = sorted(by_label[label], key=lambda r: r.path)
            rng.shuffle(group)
            out.extend(group[:per_label])
    return out


def summarize(records: list[Record]) -> dict:
    table: dict = defaultdict(Counter)
    for r in records:
        table[r.split][r.label] += 1
    return {s: dict(c) for s, c in sorted(table.items())}


# --- near duplicates -------------------------------------------------------------

@dataclass
class NearDuplicate:
    a: str
    b: str
    split_a: str
    split_b: str
    distance: int


def dhash(gray: np.ndarray, size: int = 16) -> np.ndarray:
    """Difference hash (size*size bits): robust to resizing and re-encoding."""
    from PIL import Image

    img = Image.fromarray((np.clip(gray, 0, 1) * 255).astype(np.uint8)).resize((size + 1, size), Image.BILINEAR)
    a = np.asarray(img, dtype=np.int16)
    return (a[:, 1:] > a[:, :-1]).flatten()


def find_near_duplicates(records: list[Record], hashes: np.ndarray, max_distance: int = 10) -> list[NearDuplicate]:
    """Pairs of images in different splits whose hashes differ in <= max_distance bits."""
    splits = np.array([r.split for r in records])
    packed = np.packbits(hashes.astype(bool), axis=1)
    out = []
    order = ["test", "val"]
    for s in order:
        idx_s = np.where(splits == s)[0]
        others = np.where((splits != s) & ~np.isin(splits, order[: order.index(s)]))[0]
        if len(idx_s) == 0 or len(others) == 0:
            continue
        other_bits = packed[others]
        for i in idx_s:
            d = np.unpackbits(np.bitwise_xor(other_bits, packed[i]), axis=1).sum(axis=1)
            for j in np.where(d <= max_distance)[0]:
                o = others[j]
                out.append(NearDuplicate(records[i].path, records[o].path, s, records[o].split, int(d[j])))
    return out


def split_records(records: list[Record]) -> dict[str, list[Record]]:
    return {s: [r for r in records if r.split == s] for s in ("train", "val", "test")}
