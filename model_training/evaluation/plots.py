"""Learning curves, confusion matrices and ROC curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def learning_curves(history: list[dict] | dict[str, list[dict]], out: Path) -> None:
    """One run's curves, or several runs' ({name: history}, an ensemble's members) on the same axes."""
    runs = history if isinstance(history, dict) else {"": history}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for name, hist in runs.items():
            ep = [h["epoch"] for h in hist]
            tag = f"{name}: " if name else ""
            ax.plot(ep, [h[f"train_{key}"] for h in hist], "o-", label=tag + "train")
            ax.plot(ep, [h[f"val_{key}"] for h in hist], "o-", label=tag + "validation")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def confusion(cm: list[list[int]], classes: list[str], out: Path, title: str = "") -> None:
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.6 * len(classes) + 2, 1.4 * len(classes) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def roc(y: np.ndarray, probs: np.ndarray, classes: list[str], out: Path, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, c in enumerate(classes):
        yb = (np.asarray(y) == i).astype(int)
        if yb.min() == yb.max():
            continue
        fpr, tpr, _ = roc_curve(yb, probs[:, i])
        ax.plot(fpr, tpr, label=c)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title or "ROC (one vs rest)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
