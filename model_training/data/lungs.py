"""Lung-field masks (``lungmasks/`` in the shared data) and how much of a heatmap falls on the lungs.

A model that reads the disease should put its heatmap on the lung fields; one that reads the hospital
puts it on borders, text, markers and the shoulders. The share of heatmap mass inside the mask, next to
the mask's own share of the image (what a flat heatmap would get), measures that.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from uplink_server.gradcam import in_frame, normalize_cam

from .datasets import data_root


@dataclass
class LungMask:
    image: str  # absolute path of the X-ray
    mask_path: str
    label: str
    patient_id: str = ""

    def load(self) -> np.ndarray:
        """Boolean (H, W) at the size of the stored image."""
        return np.asarray(Image.open(self.mask_path).convert("L")) > 127


def load_masks(root: Path | None = None) -> list[LungMask]:
    root = (root or data_root()) / "lungmasks"
    csv_path = root / "labels.csv"
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="") as fh:
        return [LungMask(str((root / r["image"]).resolve()), str((root / r["mask"]).resolve()), r["label"],
                         r.get("patient_id", ""))
                for r in csv.DictReader(fh)]


def lung_share(cam: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int] | None = None) -> float:
    """Share of the shown heatmap (rectified, normalised, drawn over the image as the server does, into the
    ``box`` the model read) inside the lung mask; NaN for an empty heatmap."""
    heat = in_frame(normalize_cam(cam), (mask.shape[1], mask.shape[0]), box)
    total = float(heat.sum())
    return float(heat[mask].sum() / total) if total > 0 else float("nan")


def read_boxes(paths: list[str], spec) -> dict[str, tuple[int, int, int, int]]:
    """{path: the box the model reads in that stored image under ``spec``} (what lung_share draws into)."""
    from uplink_server.imaging import decode
    from uplink_server.preprocessing import view_box

    return {p: view_box(decode(p).gray, spec) for p in paths}


def summarize(shares: list[float], masks: list[np.ndarray], boxes: list | None = None) -> dict:
    """Mean share on the lungs, and what a flat heatmap would get: the lungs' share of the image, or of the box
    the model read (a model that reads only the lung box starts higher)."""
    vals = np.array([s for s in shares if not np.isnan(s)])
    flat = [float(m.mean()) for m in masks]
    if boxes:
        flat = [float(m[t:b, l:r].mean()) for m, (t, b, l, r) in zip(masks, boxes)]
    return {
        "n": int(len(vals)),
        "mean_share_in_lungs": float(vals.mean()) if len(vals) else None,
        "mean_lung_area": float(np.mean([m.mean() for m in masks])) if masks else None,
        "flat_share": float(np.mean(flat)) if flat else None,
    }
