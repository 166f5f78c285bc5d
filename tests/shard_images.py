"""Images for the shard tests (tests/unit/test_shards.py, tests/integration/test_shards_s3.py)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adaptflow.contracts import Preprocessing, Snapshot
from adaptflow.data.images import ImageStore, ResizeCrop, decode_image

PRE = Preprocessing(input_size=16, resize_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def make_image_folder(root: Path, per_class: int = 20, classes: str = "abc", seed: int = 7) -> Path:
    """Distinct noise images, a class tint each: every image is its own sha256."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (16, 16, 3), dtype=np.uint8)
            pixels[..., c] += 120
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def pixel_digest(image: torch.Tensor) -> str:
    return hashlib.sha256(image.numpy().tobytes()).hexdigest()


def expected_digests(snapshot: Snapshot) -> Counter[str]:
    """Each training image's decoded pixels, decoded here from its source, not from a shard."""
    store, transform = ImageStore(), ResizeCrop(PRE)
    return Counter(
        pixel_digest(transform(decode_image(store.read(e), resize_size=PRE.resize_size)))
        for e in snapshot.split("train")
    )
