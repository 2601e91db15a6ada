"""Model cards: everything needed to serve, reproduce and judge a model."""

from __future__ import annotations

import datetime as dt
import json
import platform
from collections import Counter
from importlib import metadata
from pathlib import Path

from uplink_server import NOTICE

INTENDED_USE = (
    "Screening support for frontal (PA/AP) chest radiographs in settings without a radiologist at hand: "
    "prioritise the worklist and flag studies for review. " + NOTICE
)
KNN_GATE_METHOD = (
    "k-nearest-neighbour distance (k=3) to 2000 training X-rays drawn over every source in the model's embedding and "
    "in a 16x16 thumbnail, each scaled by its 99th percentile on validation X-rays; threshold at the highest of the "
    "99.5th percentile of the summed score on validation X-rays and each source's 99th percentile (20 or more films)"
)
KNOWN_LIMITS = [
    "Source and age confound the labels: every Kermany image is a child (Guangzhou), every COVID-19 and adult "
    "image an adult from other hospitals (US normals; most COVID-19 from Spain). Part of any accuracy may come "
    "from recognising the hospital or the age group rather than the disease; see the per-source tables.",
    "radiography/ has no patient ids: its images may share patients across splits, so its numbers are optimistic.",
    "Trained on downscaled images (224 px Kermany/radiography, <= 512 px covid); not validated on full-resolution DICOM.",
    "Not validated on lateral views, portable ICU films with devices, or on populations of Ecuador.",
    "Classes are the ones listed in this card only: other findings (effusion, masses, nodules, ...) are unknown to "
    "the model and may be called normal.",
]


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "numpy", "pillow", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_card(*, cfg, arch, classes, spec, aug, records, metrics, calibration, history, best_epoch,
               train_minutes, data_info, export_report, ood_threshold, name=None, version=None) -> dict:
    sources = Counter((r.source, r.license or "see source") for r in records)
    licences = sorted({r.license for r in records if r.license})
    noncommercial = [lic for lic in licences if "NC" in lic.upper()]
    return {
        "name": name or f"cxr-{arch.name}",
        "version": version or dt.date.today().isoformat(),
        "architecture": arch.name,
        "format": "onnx",
        "classes": classes,
        "preprocessing": spec.to_dict(),
        "outputs": {"logits": "logits", "cam": "cam", "embedding": "embedding"},
        "calibration": calibration,
        "uncertain_threshold": cfg.uncertain_threshold,
        "ood": {"file": "ood.npz", "threshold": ood_threshold,
                "method": KNN_GATE_METHOD},
        "intended_use": INTENDED_USE,
        "known_limits": KNOWN_LIMITS,
        "training": {
            "command": cfg.command,
            "config": {k: v for k, v in vars(cfg).items() if k not in ("progress", "command")},
            "pretrained": cfg.pretrained,
            "augmentation": aug.to_dict(),
            "epochs_run": len(history),
            "best_epoch": best_epoch,
            "minutes": round(train_minutes, 2),
            "history": history,
        },
        "data": {
            "specs": cfg.data,
            **data_info,
            "sources": [{"source": s, "license": lic, "images": n} for (s, lic), n in sorted(sources.items())],
            "licences": licences,
            "non_commercial_licences": noncommercial,
            "licence_note": (
                "Part of the training data carries non-commercial licences (" + ", ".join(noncommercial) + "): "
                "the trained weights should be used for non-commercial purposes only."
            ) if noncommercial else "No non-commercial licence in the training data.",
        },
        "metrics": metrics,
        "export": export_report,
        "library_versions": library_versions(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(v, nd=4):
    return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def card_markdown(card: dict) -> str:
    m = card["metrics"]
    lines = [f"# Model card: {card['name']} ({card['version']})", "", f"**Intended use.** {card['intended_use']}", ""]
    lines += ["## Summary", "", f"- Architecture: `{card['architecture']}`, input {card['preprocessing']['size']}, classes {', '.join(card['classes'])}",
              f"- Training command: `{card['training']['command']}`",
              f"- Training time: {card['training']['minutes']} min, {card['training']['epochs_run']} epochs (best {card['training']['best_epoch']})",
              f"- Calibration: temperature {card['calibration']['temperature']:.3f}; validation ECE {card['calibration']['ece_val_before']:.4f} -> {card['calibration']['ece_val_after']:.4f}"
              + (f"; test ECE {card['calibration']['ece_test_before']:.4f} -> {card['calibration']['ece_test_after']:.4f}" if "ece_test_before" in card["calibration"] else ""),
              (f"- Uncertain when the top two classes are within {card['uncertainty']['threshold']:.3f} (see *Uncertainty rule*)"
               if card.get("uncertainty") else f"- Uncertain below top probability {card['uncertain_threshold']}"),
              (f"- Triage: needs a doctor's read when 1 - p(normal) >= {card['triage']['threshold']:.4f} (see *Triage*)"
               if card.get("triage") else "- Triage: the most probable class (no triage threshold in this card)")]
    for i, mem in enumerate(card.get("members", [])):
        lines.append(f"- Member {i}: {mem['name']} {mem['version']} (`{mem['model']}`), best epoch {mem['best_epoch']}, "
                     f"validation loss {_fmt(mem['val_loss_at_best_epoch'])}; trained with `{mem['command']}`")
    if "float16_weight_tensors" in card.get("export", {}):
        lines.append(f"- Weights: {card['export']['weights']}; largest probability change from it "
                     f"{card['export']['max_abs_probability_change_vs_float32']:.5f} on {card['export']['checked_images']} validation images")
    lines.append("")
    lines += ["## Metrics", "", "| split | n | accuracy | loss | F1 macro | ROC-AUC macro | ECE |", "|---|---|---|---|---|---|---|"]
    for s, mm in m.items():
        lines.append(f"| {s} | {mm['n']} | {_fmt(mm['accuracy'])} | {_fmt(mm['loss'])} | {_fmt(mm['f1_macro'])} | {_fmt(mm['roc_auc_macro'])} | {_fmt(mm['ece'])} |")
    for s, mm in m.items():
        lines += ["", f"### {s}: per class", "", "| class | precision | sensitivity | specificity | F1 | ROC-AUC | n |", "|---|---|---|---|---|---|---|"]
        for c, pc in mm["per_class"].items():
            lines.append(f"| {c} | {_fmt(pc['precision'])} | {_fmt(pc['sensitivity'])} | {_fmt(pc['specificity'])} | {_fmt(pc['f1'])} | {_fmt(pc['roc_auc'])} | {pc['support']} |")
        lines += ["", f"### {s}: per source (shortcut check)", "", "| source | n | accuracy | predicted as (normal/pneumonia/covid19...) | true labels |", "|---|---|---|---|---|"]
        for src, sm in mm.get("by_source", {}).items():
            cm = sm["confusion_matrix"]
            pred_counts = [sum(row[j] for row in cm) for j in range(len(cm))]
            true_counts = [sum(row) for row in cm]
            lines.append(f"| {src} | {sm['n']} | {_fmt(sm['accuracy'])} | {pred_counts} | {true_counts} |")
    if card.get("shortcut_checks"):
        lines += ["", "## Shortcut checks", ""] + [f"- {x}" for x in card["shortcut_checks"]]
    lines += ["", "## Data", "", f"- Specs: {card['data']['specs']}", f"- Splits: {card['data']['splits']}",
              f"- Near-duplicates across splits: {card['data']['near_duplicates_across_splits']}",
              f"- Licences: {', '.join(card['data']['licences'])}", f"- {card['data']['licence_note']}", "",
              "| source | licence | images |", "|---|---|---|"]
    lines += [f"| {s['source']} | {s['license']} | {s['images']} |" for s in card["data"]["sources"]]
    lines += ["", "## Known limits", ""] + [f"- {x}" for x in card["known_limits"]]
    lines += ["", "## Plots", "", "![learning curves](learning_curves.png) ![confusion matrix](confusion_matrix.png) ![ROC](roc.png)", ""]
    lines += ["## Versions", "", f"{card['library_versions']}", f"Date: {card['date']}", ""]
    return "\n".join(lines)


def markdown_path(card_json: Path) -> Path:
    """The Markdown beside a card: ``X.card.md`` for a shipped ``X.card.json``, ``model_card.md`` in a run folder."""
    name = card_json.name
    return card_json.with_name(name[: -len(".json")] + ".md") if name.endswith(".json") else card_json.with_suffix(".md")


def replace_section(md: Path, head: str, body: str) -> None:
    """Put ``## head`` with ``body`` into a card's Markdown, replacing that section when it is there already."""
    text = md.read_text()
    head = f"## {head}"
    block = f"{head}\n\n{body.rstrip()}\n"
    if head in text:
        start = text.index(head)
        end = text.find("\n## ", start + len(head))
        text = text[:start] + block + (text[end:] if end != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + block
    md.write_text(text)


def write_card(card: dict, path: Path) -> None:
    path.write_text(json.dumps(card, indent=2))
    md = path.with_suffix(".md") if path.name != "model_card.json" else path.parent / "model_card.md"
    md.write_text(card_markdown(card))


def record_in_card(model_path: Path, key: str, value, section: str, body: str) -> Path:
    """Put ``value`` under ``key`` in a model's card and ``body`` as its Markdown section (when the card has one)."""
    from uplink_server.model import find_card

    card_path = find_card(Path(model_path))
    if card_path is None:
        raise FileNotFoundError(f"no model card beside {model_path}")
    card = json.loads(card_path.read_text())
    card[key] = value
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    md = markdown_path(card_path)
    if md.is_file():
        replace_section(md, section, body)
    return card_path
