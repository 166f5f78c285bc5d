"""Figures a person would rather look at than read: confusion matrices, learning curves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from adaptflow.contracts import EpochRecord


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # headless: pods and CI have no display
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class ConfusionLayout:
    """Sizes that keep a confusion matrix legible at ``DPI``: the panel grows with the classes so
    every cell stays about half an inch or more, and the fonts follow the cell size within a
    readable range (never below ``MIN_FONT`` points)."""

    panel_inches: float
    cell_font: float  # the count printed in each cell
    tick_font: float  # class names
    label_font: float  # axis labels and the title
    rotate_ticks: bool

    DPI: ClassVar[int] = 100
    MIN_FONT: ClassVar[float] = 9.0


def confusion_layout(classes: Sequence[str]) -> ConfusionLayout:
    n = max(1, len(classes))
    panel = min(16.0, max(4.5, 0.5 * n + 3.0))
    cell_points = (panel - 2.0) / n * 72  # the plotting area is roughly the panel less the labels
    longest = max((len(c) for c in classes), default=1)
    return ConfusionLayout(
        panel_inches=panel,
        cell_font=min(14.0, max(ConfusionLayout.MIN_FONT, 0.3 * cell_points)),
        tick_font=min(12.0, max(ConfusionLayout.MIN_FONT, 0.25 * cell_points)),
        label_font=12.0,
        rotate_ticks=n > 6 or longest > 6,
    )


def draw_confusion(ax, matrix: list[list[int]], classes: Sequence[str], title: str) -> None:  # type: ignore[no-untyped-def]
    """Counts annotated in every cell (white on dark cells), class names on both axes."""
    layout = confusion_layout(classes)
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(classes))
    if layout.rotate_ticks:
        ax.set_xticks(ticks, labels=list(classes), fontsize=layout.tick_font, rotation=45, ha="right")
    else:
        ax.set_xticks(ticks, labels=list(classes), fontsize=layout.tick_font)
    ax.set_yticks(ticks, labels=list(classes), fontsize=layout.tick_font)
    ax.set_xlabel("predicted", fontsize=layout.label_font)
    ax.set_ylabel("true", fontsize=layout.label_font)
    ax.set_title(title, fontsize=layout.label_font)
    peak = max((max(row) for row in matrix if row), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                fontsize=layout.cell_font,
                color="white" if value > peak / 2 else "black",
            )


def confusion_matrix_png(matrix: list[list[int]], classes: Sequence[str], title: str, path: Path) -> Path:
    plt = _pyplot()
    size = confusion_layout(classes).panel_inches
    fig, ax = plt.subplots(figsize=(size, size))
    draw_confusion(ax, matrix, classes, title)
    fig.tight_layout()
    fig.savefig(path, dpi=ConfusionLayout.DPI)
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
