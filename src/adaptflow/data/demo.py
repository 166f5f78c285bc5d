"""Demo data without network: ImageFolder trees from scikit-learn's handwritten digits.

The split-task design of Yosinski et al. (2014): a *source* task (digits 0-4) to pretrain a
backbone on, a *target* task (digits 5-9) to adapt it to, and two shifted targets:

- ``target-shifted``: 5-9 inverted and rotated 90 degrees. A change of appearance the source
  features still separate linearly (bench/RESULTS.md).
- ``target-texture``: 5-9 drawn in texture. Stripes at +45 degrees fill the strokes and stripes
  at -45 degrees the background, so brightness is the same everywhere and the digit exists only
  as a change of orientation (a second-order, texture-defined figure). The source backbone learnt
  its features from ink on black; these images need features it does not have, which is where
  fine-tuning pays over a frozen backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# The demo's target tasks (the module docstring says what each one is).
TARGET_TREES = ("target", "target-shifted", "target-texture")

SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)
SHIFT_ROTATION_DEGREES = 90
# Bump when the trees change, so a cached demo folder from an older version is rewritten.
DEMO_DATA_VERSION = "2"


@dataclass(frozen=True)
class DemoData:
    root: Path
    source: Path
    target: Path
    target_shifted: Path
    target_texture: Path
    counts: dict[str, int]


def _ink(pixels: np.ndarray, size: int) -> Image.Image:
    # digits are 8x8 with values 0..16 (ink is high); scale to 0..255 and upsample smoothly.
    gray = Image.fromarray(np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
    return gray.resize((size, size), Image.Resampling.BILINEAR)


def _to_image(pixels: np.ndarray, size: int) -> Image.Image:
    return _ink(pixels, size).convert("RGB")


def _texture(pixels: np.ndarray, size: int) -> Image.Image:
    ink = np.asarray(_ink(pixels, size), dtype=np.float64) / 255.0
    rows, cols = np.mgrid[0:size, 0:size]
    period = max(size / 8.0, 3.0)  # 4 px at 32 px: fine enough to leave the strokes legible
    inside = 0.5 + 0.5 * np.sin(2 * np.pi * (cols + rows) / (period * np.sqrt(2)))
    outside = 0.5 + 0.5 * np.sin(2 * np.pi * (cols - rows) / (period * np.sqrt(2)))
    picture = ink * inside + (1.0 - ink) * outside
    return Image.fromarray(np.round(picture * 255).astype(np.uint8), mode="L").convert("RGB")


def _shift(image: Image.Image) -> Image.Image:
    return ImageOps.invert(image).rotate(SHIFT_ROTATION_DEGREES)


def write_demo_data(root: str | Path, size: int = 32, limit_per_class: int | None = None) -> DemoData:
    """Writes ``source/``, ``target/``, ``target-shifted/`` and ``target-texture/``; returns their paths.

    ``limit_per_class`` keeps the first N images of each digit (tests use tiny trees).
    Re-running overwrites the same files with the same bytes, so fingerprints are stable.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    trees = {name: root / name for name in ("source", *TARGET_TREES)}
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
            outputs = [
                ("target", image),
                ("target-shifted", _shift(image)),
                ("target-texture", _texture(pixels, size)),
            ]
        for tree, picture in outputs:
            folder = trees[tree] / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            picture.save(folder / name, format="PNG", optimize=False)
            counts[tree] += 1
    return DemoData(
        root, trees["source"], trees["target"], trees["target-shifted"], trees["target-texture"], counts
    )
