"""Demo data without network: ImageFolder trees from scikit-learn's handwritten digits.

The split-task design of Yosinski et al. (2014): a *source* task (digits 0-4) to pretrain a
backbone on, a *target* task (digits 5-9) to adapt it to, and a *shifted* target (5-9, inverted
and rotated) where a frozen backbone's features fit worse and fine-tuning should pay.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)
SHIFT_ROTATION_DEGREES = 90


@dataclass(frozen=True)
class DemoData:
    root: Path
    source: Path
    target: Path
    target_shifted: Path
    counts: dict[str, int]


def _to_image(pixels: np.ndarray, size: int) -> Image.Image:
    # digits are 8x8 with values 0..16 (ink is high); scale to 0..255 and upsample smoothly.
    gray = Image.fromarray(np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
    return gray.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


def _shift(image: Image.Image) -> Image.Image:
    return ImageOps.invert(image).rotate(SHIFT_ROTATION_DEGREES)


def write_demo_data(root: str | Path, size: int = 32, limit_per_class: int | None = None) -> DemoData:
    """Writes ``source/``, ``target/`` and ``target-shifted/`` under ``root``; returns their paths.

    ``limit_per_class`` keeps the first N images of each digit (tests use tiny trees).
    Re-running overwrites the same files with the same bytes, so fingerprints are stable.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    trees = {"source": root / "source", "target": root / "target", "target-shifted": root / "target-shifted"}
    counts = dict.fromkeys(trees, 0)
    seen: dict[int, int] = {}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = int(label)
        seen[label] = seen.get(label, 0) + 1
        if limit_per_class is not None and seen[label] > limit_per_class:
            continue
        image = _to_image(pixels, size)
        name = f"{index:04d}.png"
        if label in SOURCE_DIGITS:
            outputs = [("source", image)]
        else:
            outputs = [("target", image), ("target-shifted", _shift(image))]
        for tree, picture in outputs:
            folder = trees[tree] / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            picture.save(folder / name, format="PNG", optimize=False)
            counts[tree] += 1
    return DemoData(root, trees["source"], trees["target"], trees["target-shifted"], counts)
