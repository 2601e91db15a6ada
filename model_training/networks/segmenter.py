"""The lung segmenter: a small U-Net trained on the public lung masks (``lungmasks/``), exported to ONNX.

Served by :mod:`uplink_server.lungfield` (ONNX Runtime only): a classifier trained with ``--roi lungs``
reads only the box around the lungs it finds. ``python -m model_training segmenter`` trains it, checks it
on patients it never saw (Dice, and whether the box keeps the lungs), and writes its card.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from uplink_server.imaging import decode
from uplink_server.lungfield import SIZE, box_from_mask, segmenter_input

from ..data import lungs
from ..release.model_card import markdown_path

VERSION = "1.0.0"


def _block(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                         nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015), narrow: lung outlines at 128 px need few channels. Outputs logits."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.down = nn.ModuleList()
        c = 1
        for w in widths:
            self.down.append(_block(c, w))
            c = w
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(_block(c + w, w))
            c = w
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for block in self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skips.pop()], 1))
        return self.head(x)


def load_pairs(masks: list[lungs.LungMask], progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, SIZE, SIZE) segmenter inputs and (N, 1, SIZE, SIZE) {0, 1} masks."""
    xs, ys = [], []
    for m in tqdm(masks, desc="lung masks", disable=not progress, leave=False):
        xs.append(segmenter_input(decode(m.image).gray))
        mask = Image.fromarray(m.load().astype(np.uint8) * 255).resize((SIZE, SIZE), Image.BILINEAR)
        ys.append((np.asarray(mask) > 127).astype(np.float32)[None])
    return np.stack(xs), np.stack(ys)


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random affine (rotation, zoom, aspect, shift, flip) on images and masks; noise on images.
    Aspect changes matter: some collections were squashed to 224 x 224 by a third party."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)  # noqa: E731
    ang = u(-0.2, 0.2)
    zoom = u(0.85, 1.2)
    aspect = u(0.85, 1.15)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    sx, sy = flip * aspect / zoom, 1.0 / (aspect * zoom)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = sx * torch.cos(ang), -torch.sin(ang) * sy
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) * sx, sy * torch.cos(ang)
    theta[:, 0, 2], theta[:, 1, 2] = u(-0.1, 0.1), u(-0.1, 0.1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="border")
    y = (F.grid_sample(y, grid, align_corners=False) > 0.5).float()
    x = x * u(0.8, 1.2)[:, None, None, None] + 0.1 * torch.randn(x.shape, generator=gen)
    return x, y


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * y).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, y) + dice.mean()


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    inter = float((pred & true).sum())
    total = float(pred.sum() + true.sum())
    return 2 * inter / total if total else 1.0


def box_checks(pred: np.ndarray, true: np.ndarray) -> dict:
    """How the classifier's box (from the predicted mask) treats the true lungs: the share of lung pixels
    inside it (lungs cut off if < 1) and the share of the image it keeps."""
    t, b, l, r = box_from_mask(pred, true.shape)
    inside = float(true[t:b, l:r].sum() / max(1, true.sum()))
    return {"lungs_inside_box": inside, "box_area": (b - t) * (r - l) / true.size, "found": (t, b, l, r) != (0, true.shape[0], 0, true.shape[1])}


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict:
    model.eval()
    with torch.no_grad():
        pred = torch.sigmoid(model(torch.from_numpy(x))).numpy()[:, 0] > 0.5
    true = y[:, 0] > 0.5
    dices = [dice(p, t) for p, t in zip(pred, true)]
    boxes = [box_checks(p, t) for p, t in zip(pred, true)]
    return {"n": int(len(x)), "dice_mean": float(np.mean(dices)), "dice_median": float(np.median(dices)),
            "dice_min": float(np.min(dices)), "lungs_inside_box": float(np.mean([b["lungs_inside_box"] for b in boxes])),
            "lungs_inside_box_min": float(np.min([b["lungs_inside_box"] for b in boxes])),
            "box_area": float(np.mean([b["box_area"] for b in boxes])),
            "found": float(np.mean([b["found"] for b in boxes]))}


def _patient(m: lungs.LungMask) -> str:
    return m.patient_id or m.image  # an image without a patient id stands alone


def split_by_patient(masks: list[lungs.LungMask], val_frac: float, seed: int) -> tuple[list, list]:
    patients = sorted({_patient(m) for m in masks})
    random.Random(seed).shuffle(patients)
    val = set(patients[:max(1, round(val_frac * len(patients)))])
    return [m for m in masks if _patient(m) not in val], [m for m in masks if _patient(m) in val]


@dataclass
class SegmenterConfig:
    out: str = "weights/lung-segmenter.onnx"
    epochs: int = 40
    batch_size: int = 16
    lr: float = 3e-3
    val_frac: float = 0.2
    limit_patients: int | None = None  # quick runs and tests
    seed: int = 0
    progress: bool = True


def export(model: nn.Module, path: Path, check: np.ndarray) -> float:
    """Write the ONNX file and return the largest |torch - ONNX Runtime| logit difference on ``check``."""
    import onnxruntime as ort

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, SIZE, SIZE),), str(path), input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    with torch.no_grad():
        ref = model(torch.from_numpy(check)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": check})[0]
    return float(np.abs(ref - got).max())


def train_segmenter(cfg: SegmenterConfig, command: str = "", check: dict | None = None) -> dict:
    """Train, check on held-out patients (and the found-lungs rate on ``check``: {name: records without masks}),
    export next to its card (.card.json and .card.md); returns the card."""
    torch.manual_seed(cfg.seed)
    masks = lungs.load_masks()
    if not masks:
        raise FileNotFoundError("no lung masks: the segmenter trains on ../shared/data/lungmasks (or CXR_DATA_ROOT)")
    if cfg.limit_patients:
        keep = set(sorted({_patient(m) for m in masks})[: cfg.limit_patients])
        masks = [m for m in masks if _patient(m) in keep]
    tr, va = split_by_patient(masks, cfg.val_frac, cfg.seed)
    xtr, ytr = load_pairs(tr, cfg.progress)
    xva, yva = load_pairs(va, cfg.progress)
    model = UNet()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * max(1, -(-len(xtr) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    history = []
    for epoch in tqdm(range(cfg.epochs), desc="segmenter", disable=not cfg.progress):
        model.train()
        order = torch.randperm(len(xtr), generator=gen)
        losses = []
        for i in range(0, len(xtr), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x, y = _augment(torch.from_numpy(xtr[idx]), torch.from_numpy(ytr[idx]), gen)
            loss = _loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)))
    val = evaluate(model, xva, yva)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    diff = export(model, out, xva[:4])
    card = {
        "name": "lung-segmenter", "version": VERSION, "file": out.name, "input": f"1 x {SIZE} x {SIZE}, equalised gray "
        "(uplink_server.lungfield.segmenter_input)", "output": "lung logits, same size",
        "trained_on": {"masks": "lungmasks/ (V7 Labs polygons, CC BY 4.0) on covid/ieee8023 images",
                       "images": len(tr), "patients": len({_patient(m) for m in tr})},
        "validation": {"patients": len({_patient(m) for m in va}), **val},
        "epochs": cfg.epochs, "train_loss": history, "train_seconds": round(time.time() - t0, 1),
        "onnx_max_abs_diff": diff, "command": command,
        "limits": "Adult frontal X-rays of one multi-hospital collection (covid/ieee8023) only. No masks of "
                  "children or of the radiography/ collection exist here: on those, only the found-lungs rate is "
                  "known. A classifier with roi='lungs' reads the whole frame where no lungs are found.",
    }
    card["other_sources"] = {name: found_rate(recs, out, seed=cfg.seed) for name, recs in (check or {}).items()}
    card_path = out.with_name(out.name.replace(".onnx", ".card.json"))
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    markdown_path(card_path).write_text(card_markdown(card))
    return card


def found_rate(records, path: Path, n: int = 200, seed: int = 0) -> dict:
    """On images without masks (other sources, children): how often lungs are found, and the box's share of the
    image. Plausibility only: no ground truth."""
    from uplink_server.lungfield import lung_probability

    rng = np.random.default_rng(seed)
    pick = [records[i] for i in rng.permutation(len(records))[:n]]
    found, area = [], []
    for r in pick:
        gray = decode(r.path).gray
        t, b, l, rr = box_from_mask(lung_probability([gray], path)[0] > 0.5, gray.shape)
        found.append((t, b, l, rr) != (0, gray.shape[0], 0, gray.shape[1]))
        area.append((b - t) * (rr - l) / gray.size)
    return {"n": len(pick), "found": float(np.mean(found)), "box_area": float(np.mean(area))}


def card_markdown(card: dict) -> str:
    v = card["validation"]
    lines = [f"# Lung segmenter {card['version']}", "",
             "Finds the lung field so that a classifier trained with `--roi lungs` reads only the box around the lungs "
             "(not the text, markers and borders that tell hospitals apart). Decision support plumbing, not a diagnosis.", "",
             f"- Input: {card['input']}; output: {card['output']}.",
             f"- Trained on {card['trained_on']['images']} images of {card['trained_on']['patients']} patients: {card['trained_on']['masks']}.",
             f"- Patients it never saw ({v['patients']} patients, {v['n']} images): Dice {v['dice_mean']:.3f} (median "
             f"{v['dice_median']:.3f}, lowest {v['dice_min']:.3f}); the classifier's box keeps {v['lungs_inside_box']:.1%} of the "
             f"lung pixels (lowest {v['lungs_inside_box_min']:.1%}) in {v['box_area']:.0%} of the image; it is tighter than the whole "
             f"image for {v['found']:.0%} (the rest: lungs that fill the frame, or none found)."]
    for name, f in card.get("other_sources", {}).items():
        lines.append(f"- `{name}` (a sample, masks not used): a box tighter than the whole image for {f['found']:.0%} of {f['n']} images, "
                     f"{f['box_area']:.0%} of the image on average.")
    lines += [f"- Limits: {card['limits']}", f"- Reproduce: `{card['command']}`" if card.get("command") else ""]
    return "\n".join(lines).rstrip() + "\n"
