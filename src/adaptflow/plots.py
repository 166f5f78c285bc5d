"""Figures a person would rather look at than read: confusion matrices, learning curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from adaptflow.contracts import EpochRecord


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # headless: pods and CI have no display
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_png(matrix: list[list[int]], classes: Sequence[str], title: str, path: Path) -> Path:
    plt = _pyplot()
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(
                j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black"
            )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_curves_png(history: Sequence[EpochRecord], title: str, path: Path) -> Path:
    plt = _pyplot()
    epochs = [h.epoch for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h.train_loss for h in history], label="train")
    loss_ax.plot(epochs, [h.val_loss for h in history], label="val")
    loss_ax.set_title("loss")
    loss_ax.set_xlabel("epoch")
    acc_ax.plot(epochs, [h.train_accuracy for h in history], label="train")
    acc_ax.plot(epochs, [h.val_accuracy for h in history], label="val")
    acc_ax.set_title("accuracy (gap = overfitting)")
    acc_ax.set_xlabel("epoch")
    for ax in (loss_ax, acc_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
