"""Training: transfer learning with a frozen phase, then optional fine-tuning."""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler
from tqdm import tqdm

from uplink_server.preprocessing import PreprocessSpec

from ..data.augmentation import Augmenter, parse_augment
from ..data.datasets import DataError, Record, check_files, load_input, load_spec, write_manifest
from ..data.labels import classes_present
from ..data.preflight import UnreadableImages, hash_images
from ..data.sampling import sample_weights
from ..data.splits import find_near_duplicates, limit_records, make_splits, split_records, summarize
from ..evaluation import plots
from ..evaluation.metrics import calibrate_and_report
from ..networks.architectures import DEFAULT_ARCH, create_model
from ..release.export import export_onnx
from ..release.gate import fit_ood_gate
from ..release.model_card import build_card, write_card
from .distillation import Teacher, distillation_loss

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=lambda: ["public"])
    arch: str = DEFAULT_ARCH
    epochs: int = 5
    out: str = "runs/latest"
    pretrained: str = "imagenet"
    img_size: int | None = None  # default: the architecture's native size
    batch_size: int = 32
    lr: float = 1e-3  # head
    backbone_lr: float = 1e-4  # fine-tuned blocks
    weight_decay: float = 1e-4
    freeze_epochs: int | None = None  # default: 1 when pretrained, else 0
    finetune_blocks: int = -1  # top blocks unfrozen after the frozen phase; -1 all, 0 none
    # BatchNorm statistics of frozen layers: "imagenet" keeps ImageNet's; "adapt" lets them follow the X-rays
    # from the first batch, so that unfreezing does not switch the features the head was fitted to
    frozen_bn: str = "imagenet"
    augment: str = "default"
    balance: str = "weights"  # weights | sampler | group | source | none
    intensity: str = "none"  # none | equalize (PreprocessSpec)
    crop: float = 0.0  # share of each side cut before resizing (PreprocessSpec)
    roi: str = "frame"  # frame | lungs: what the model reads (PreprocessSpec)
    patience: int = 3
    seed: int = 0
    limit: int | None = None  # images per split, for quick runs
    samples_per_epoch: int | None = None
    val_frac: float = 0.1
    test_frac: float = 0.15
    workers: int = 1
    skip_unreadable: bool = False
    uncertain_threshold: float = 0.5
    dropout: float = 0.2
    progress: bool = True
    device: str = "auto"  # auto: CUDA when available, else CPU
    # distillation (model_training.training.distillation): an exported model whose softened answers the network
    # also learns, weighted against the labels' cross-entropy
    teacher: str = ""
    distill_weight: float = 0.8
    distill_temperature: float = 2.0
    command: str = ""


class XrayDataset(Dataset):
    def __init__(self, records: list[Record], classes: list[str], spec: PreprocessSpec, augment=None, seed: int = 0):
        self.records = records
        self.index = {c: i for i, c in enumerate(classes)}
        self.spec = spec
        self.augment_cfg = augment
        self.seed = seed
        self._aug = None

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        if self.augment_cfg is not None and self._aug is None:
            # a worker gets torch's seed for it (drawn from the run's seed for every epoch's workers, so they differ
            # by epoch and worker, and the same command draws the same ones); in the main process the run's seed
            info = torch.utils.data.get_worker_info()
            self._aug = Augmenter(self.augment_cfg, seed=info.seed if info else self.seed)
        return torch.from_numpy(load_input(r.path, self.spec, self._aug)), self.index[r.label]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _set_trainable(model, phase: str, finetune_blocks: int) -> list[dict]:
    """Freeze/unfreeze and return optimizer parameter groups for the phase."""
    for p in model.backbone.parameters():
        p.requires_grad = False
    groups = [{"params": list(model.classifier.parameters()), "name": "head"}]
    if phase == "finetune" and finetune_blocks != 0:
        blocks = model.backbone_blocks()
        chosen = blocks if finetune_blocks < 0 else blocks[-finetune_blocks:]
        params = []
        for b in chosen:
            for p in b.parameters():
                p.requires_grad = True
                params.append(p)
        if finetune_blocks < 0:  # everything, including modules outside the listed blocks
            for p in model.backbone.parameters():
                if not p.requires_grad:
                    p.requires_grad = True
                    params.append(p)
        groups.append({"params": params, "name": "backbone"})
    return groups


def _keep_frozen_bn_eval(model) -> None:
    # BatchNorm statistics of frozen layers stay those of ImageNet
    for m in model.backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def predict_all(model, loader, progress=False, desc="predict"):
    """(logits, labels) over a loader, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    logits, ys = [], []
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        logits.append(model(x.to(device, non_blocking=True)).float().cpu().numpy())
        ys.append(y.numpy())
    if not logits:
        return np.zeros((0, 0)), np.zeros((0,), int)
    return np.concatenate(logits), np.concatenate(ys)


def prepare_data(cfg: TrainConfig, out: Path) -> tuple[list[Record], list[str], dict]:
    records = []
    for spec in cfg.data:
        records.extend(load_spec(spec))
    if not records:
        raise DataError("no labelled images in " + ", ".join(cfg.data))
    check_files(records)
    records = make_splits(records, cfg.val_frac, cfg.test_frac, cfg.seed)
    if cfg.limit:
        records = limit_records(records, cfg.limit, cfg.seed)
    hashes, bad = hash_images(records, workers=max(1, os.cpu_count() or 1), progress=cfg.progress)
    if bad:
        if not cfg.skip_unreadable:
            raise UnreadableImages(bad)
        bad_paths = {p for p, _ in bad}
        keep = [i for i, r in enumerate(records) if r.path not in bad_paths]
        records, hashes = [records[i] for i in keep], hashes[keep]
    dups = find_near_duplicates(records, hashes)
    classes = list(classes_present(r.label for r in records))
    if len(classes) < 2:
        raise DataError(f"need at least two classes, found {classes}")
    for s in ("train", "val"):
        if not any(r.split == s for r in records):
            raise DataError(f"no images in the {s} split (set --val-frac, or add data)")
    write_manifest(records, out / "splits.csv")
    with open(out / "near_duplicates.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path_a", "split_a", "path_b", "split_b", "hamming_distance"])
        for d in dups:
            w.writerow([d.a, d.split_a, d.b, d.split_b, d.distance])
    info = {"splits": summarize(records), "near_duplicates_across_splits": len(dups), "unreadable_skipped": len(bad)}
    print(f"data: {info['splits']}; classes {classes}", flush=True)
    if dups:
        print(f"warning: {len(dups)} near-duplicate pair(s) across splits, listed in {out / 'near_duplicates.csv'}", flush=True)
    return records, classes, info


def _build(cfg: TrainConfig, records: list[Record], classes: list[str], pretrained: str):
    """Model, input spec and evaluation loaders of a run: shared by train() and finish()."""
    model, arch = create_model(cfg.arch, len(classes), pretrained, cfg.dropout, classes=classes)
    device = resolve_device(cfg.device)
    model.to(device)
    size = cfg.img_size or arch.input_size
    if size < arch.min_size:
        print(f"note: {arch.name} needs inputs of at least {arch.min_size} px; using {arch.min_size} instead of {size}")
        size = arch.min_size
    spec = PreprocessSpec(size=(size, size), intensity=cfg.intensity, crop=cfg.crop, roi=cfg.roi)
    by_split = split_records(records)
    eval_ds = {s: XrayDataset(by_split[s], classes, spec) for s in ("val", "test") if by_split[s]}
    loader_kw = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                     pin_memory=device.type == "cuda")
    eval_loaders = {s: DataLoader(ds, shuffle=False, **loader_kw) for s, ds in eval_ds.items()}
    return model, arch, device, spec, by_split, eval_loaders, loader_kw


def train(cfg: TrainConfig) -> Path:
    # settings that cannot work fail before the data checks and the model download, not after
    if cfg.frozen_bn not in ("imagenet", "adapt", "all"):
        raise DataError(f"--frozen-bn {cfg.frozen_bn!r}: use imagenet, adapt or all")
    if str(cfg.pretrained).endswith(".onnx") and cfg.frozen_bn != "all":
        # its BatchNorms are identities over folded kernels (model_training.networks.onnx_weights): batch statistics would undo it
        raise DataError(f"--pretrained {cfg.pretrained}: continuing from an exported model needs --frozen-bn all")
    if not 0.0 <= cfg.distill_weight <= 1.0 or cfg.distill_temperature <= 0:
        raise DataError("--distill-weight must lie in [0, 1] and --distill-temperature be positive")
    if cfg.pretrained == "none" and cfg.finetune_blocks == 0:
        raise DataError("--pretrained none with --finetune-blocks 0 would train only a linear layer on random features")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _seed_all(cfg.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t_start = time.time()
    records, classes, data_info = prepare_data(cfg, out)
    model, arch, device, spec, by_split, eval_loaders, loader_kw = _build(cfg, records, classes, cfg.pretrained)
    teacher = Teacher(cfg.teacher, classes, spec) if cfg.teacher else None
    aug_cfg = parse_augment(cfg.augment)
    train_ds = XrayDataset(by_split["train"], classes, spec, aug_cfg if cfg.augment != "none" else None, cfg.seed)

    counts = np.bincount([classes.index(r.label) for r in by_split["train"]], minlength=len(classes)).astype(float)
    n_samples = cfg.samples_per_epoch or len(train_ds)
    if cfg.balance in ("sampler", "group", "source"):
        train_recs = by_split["train"]
        groups = [r.source if cfg.balance == "source" else (r.age_group or r.source) for r in train_recs]
        w = sample_weights([r.label for r in train_recs], groups, "class" if cfg.balance == "sampler" else "group")
        sampler = WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), n_samples, replacement=True)
        class_weights = None
    else:
        sampler = RandomSampler(train_ds, num_samples=n_samples if cfg.samples_per_epoch else None)
        class_weights = None
        if cfg.balance == "weights":
            cw = counts.sum() / np.maximum(counts, 1) / len(classes)
            class_weights = torch.as_tensor(cw, dtype=torch.float32, device=device)
    train_loader = DataLoader(train_ds, sampler=sampler, drop_last=len(train_ds) > cfg.batch_size, **loader_kw)
    criterion = nn.CrossEntropyLoss(weight=class_weights)
    val_criterion = nn.CrossEntropyLoss()

    freeze_epochs = cfg.freeze_epochs if cfg.freeze_epochs is not None else (1 if cfg.pretrained != "none" else 0)
    history, best_loss, best_epoch, bad_epochs = [], math.inf, 0, 0
    phase, optimizer, scheduler = None, None, None
    ckpt = out / "best.pt"
    for epoch in range(1, cfg.epochs + 1):
        want = "frozen" if epoch <= freeze_epochs or cfg.finetune_blocks == 0 else "finetune"
        if want != phase:
            phase = want
            groups = _set_trainable(model, phase, cfg.finetune_blocks)
            for g in groups:
                g["lr"] = cfg.lr if g["name"] == "head" else cfg.backbone_lr
            optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
            remaining = (freeze_epochs if phase == "frozen" else cfg.epochs - epoch + 1) * max(1, len(train_loader))
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[g["lr"] for g in groups], total_steps=max(2, remaining), pct_start=0.15
            )
        model.train()
        if cfg.frozen_bn == "imagenet":
            _keep_frozen_bn_eval(model)
        elif cfg.frozen_bn == "all":  # every BatchNorm keeps its statistics; its scale and shift still learn
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        t_ep = time.time()
        tot_loss, tot_ok, tot_n = 0.0, 0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{cfg.epochs} [{phase}]", disable=not cfg.progress)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = criterion(logits, y)
            if teacher is not None:
                soft = distillation_loss(logits, teacher.logits(x), cfg.distill_temperature)
                loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * soft
            loss.backward()
            optimizer.step()
            try:
                scheduler.step()
            except ValueError:  # stepping past the schedule's end on the last partial batch
                pass
            tot_loss += loss.item() * len(y)
            tot_ok += int((logits.argmax(1) == y).sum())
            tot_n += len(y)
            bar.set_postfix(loss=f"{tot_loss / tot_n:.4f}", acc=f"{tot_ok / tot_n:.3f}")
        vl, vy = predict_all(model, eval_loaders["val"], cfg.progress, "validate")
        val_loss = float(val_criterion(torch.from_numpy(vl), torch.from_numpy(vy)))
        val_acc = float((vl.argmax(1) == vy).mean())
        history.append({
            "epoch": epoch, "phase": phase, "train_loss": tot_loss / max(tot_n, 1), "train_accuracy": tot_ok / max(tot_n, 1),
            "val_loss": val_loss, "val_accuracy": val_acc, "seconds": round(time.time() - t_ep, 1),
        })
        print(f"epoch {epoch}: train_loss={history[-1]['train_loss']:.4f} train_acc={history[-1]['train_accuracy']:.4f} "
              f"val_loss={val_loss:.4f} val_acc={val_acc:.4f} ({history[-1]['seconds']}s)", flush=True)
        with open(out / "history.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)
        if val_loss < best_loss - 1e-4:
            best_loss, best_epoch, bad_epochs = val_loss, epoch, 0
            torch.save({"state_dict": model.state_dict(), "classes": classes, "arch": cfg.arch, "epoch": epoch,
                        "config": asdict(cfg), "data_info": data_info}, ckpt)
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                print(f"early stopping: validation loss has not improved for {cfg.patience} epochs (best epoch {best_epoch})")
                break
    train_minutes = (time.time() - t_start) / 60
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    model.eval()
    plots.learning_curves(history, out / "learning_curves.png")
    return finalize(model, cfg, out, classes, spec, aug_cfg, records, by_split, eval_loaders, history, best_epoch,
                    train_minutes, data_info, arch)


def finish(run: Path) -> Path:
    """Calibrate, evaluate, export and write the card of a run whose training ended (``best.pt``) but whose
    finishing steps did not (a failed export, a machine that went away): nothing is trained again."""
    run = Path(run)
    missing = [f for f in ("best.pt", "splits.csv", "history.csv") if not (run / f).is_file()]
    if missing:
        raise DataError(f"{run} is not a run whose training ended: missing {', '.join(missing)}")
    ckpt = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    fields = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in fields})
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    records, classes = load_spec(str(run / "splits.csv")), list(ckpt["classes"])
    check_files(records)  # a run folder moved away from the data it names
    data_info = ckpt.get("data_info")
    if data_info is None:  # checkpoints from before data_info was saved in them
        dup_csv = run / "near_duplicates.csv"
        dups = max(0, len(dup_csv.read_text().splitlines()) - 1) if dup_csv.is_file() else None
        data_info = {"splits": summarize(records), "near_duplicates_across_splits": dups, "unreadable_skipped": 0}
    model, arch, _, spec, by_split, eval_loaders, _ = _build(cfg, records, classes, "none")
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    with open(run / "history.csv", newline="") as fh:
        history = [{k: (v if k == "phase" else int(v) if k == "epoch" else float(v)) for k, v in row.items()}
                   for row in csv.DictReader(fh)]
    # the epochs' own time: the setup before them was not recorded
    train_minutes = sum(h["seconds"] for h in history) / 60
    plots.learning_curves(history, run / "learning_curves.png")
    return finalize(model, cfg, run, classes, spec, parse_augment(cfg.augment), records, by_split, eval_loaders,
                    history, int(ckpt["epoch"]), train_minutes, data_info, arch)


def finalize(model, cfg, out, classes, spec, aug_cfg, records, by_split, eval_loaders, history, best_epoch,
             train_minutes, data_info, arch) -> Path:
    """Calibrate, evaluate per split and source, export ONNX, fit the OOD gate, write the card."""
    outputs = {s: predict_all(model, dl, cfg.progress, f"evaluate {s}") for s, dl in eval_loaders.items()}
    calibration, metrics = calibrate_and_report(outputs, by_split, classes, out)

    check = np.stack([eval_loaders["val"].dataset[i][0].numpy() for i in range(min(4, len(eval_loaders["val"].dataset)))])
    model.cpu()  # export and check on the CPU, where the server runs
    export_report = export_onnx(model, out / "model.onnx", spec.size, check_inputs=check)
    # OOD gate: reference X-rays from training, threshold from validation X-rays, through the exported model
    gate = fit_ood_gate(out / "model.onnx", spec, by_split, cfg.seed)
    gate.save(out / "ood.npz")
    card = build_card(
        cfg=cfg, arch=arch, classes=classes, spec=spec, aug=aug_cfg, records=records, metrics=metrics,
        calibration=calibration, history=history, best_epoch=best_epoch, train_minutes=train_minutes,
        data_info=data_info, export_report=export_report, ood_threshold=gate.threshold,
    )
    write_card(card, out / "model_card.json")
    print(f"run folder: {out}")
    return out
