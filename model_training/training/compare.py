"""Run the study's grid (architectures x data regimes) and write its tables."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .train import TrainConfig, train  # noqa: E402

# The study's epochs per regime (public Kaggle 5, mix 10, hospital-only 20).
STUDY_EPOCHS = {"public": 5, "mix": 10, "adult": 10}


def compare(archs: list[str], regimes: list[str], out: Path, base: TrainConfig, epochs: int | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for regime in regimes:
        for arch in archs:
            run_dir = out / f"{arch}-{regime}"
            cfg = replace(base, data=[regime], arch=arch, out=str(run_dir),
                          epochs=epochs or STUDY_EPOCHS.get(regime, base.epochs))
            print(f"=== {arch} on {regime}: {cfg.epochs} epochs ===", flush=True)
            train(cfg)
            card = json.loads((run_dir / "model_card.json").read_text())
            m = card["metrics"].get("test") or card["metrics"]["val"]
            rows.append({"regime": regime, "arch": arch, "epochs": card["training"]["epochs_run"],
                         "minutes": card["training"]["minutes"], "accuracy": m["accuracy"], "loss": m["loss"],
                         "f1_macro": m["f1_macro"], "roc_auc_macro": m["roc_auc_macro"], "n_test": m["n"]})
    (out / "comparison.json").write_text(json.dumps(rows, indent=2))
    (out / "comparison.md").write_text(markdown_table(rows))
    plot(rows, out / "comparison.png")
    print(markdown_table(rows))
    return {"rows": rows}


def markdown_table(rows: list[dict]) -> str:
    lines = ["# Architecture comparison (the study's Tables 2 and 3 layout)", "",
             "| regime | architecture | epochs | minutes | accuracy | loss | F1 (macro) | ROC-AUC (macro) | test images |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        auc = "n/a" if r["roc_auc_macro"] is None else f"{r['roc_auc_macro']:.4f}"
        lines.append(f"| {r['regime']} | {r['arch']} | {r['epochs']} | {r['minutes']:.1f} | {r['accuracy']:.4f} | "
                     f"{r['loss']:.4f} | {r['f1_macro']:.4f} | {auc} | {r['n_test']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(1, len(archs))
    for i, a in enumerate(archs):
        for ax, key in zip(axes, ("accuracy", "f1_macro")):
            vals = [next((r[key] for r in rows if r["arch"] == a and r["regime"] == g), 0) for g in regimes]
            ax.bar([j + i * width for j in range(len(regimes))], vals, width, label=a)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(regimes))], regimes)
            ax.set_title(key)
            ax.set_ylim(0, 1)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
