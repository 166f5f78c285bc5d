"""Fashion-MNIST from Debian's ``dataset-fashion-mnist``: IDX reading, seeded target draws, ImageFolder trees.

The split task of bench/real_data.py: source = classes 0-4, target = classes 5-9.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
PACKAGE = "dataset-fashion-mnist"
CLASS_NAMES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetMissing(RuntimeError):
    """The Fashion-MNIST IDX files are not installed."""


def find_dataset_dir() -> Path:
    """The folder with the IDX files: ``dpkg -L dataset-fashion-mnist``, else the default path."""
    candidates: list[Path] = []
    if env := os.environ.get("ADAPTFLOW_FASHION_MNIST"):
        candidates.append(Path(env))
    if shutil.which("dpkg"):
        listed = subprocess.run(["dpkg", "-L", PACKAGE], capture_output=True, text=True, check=False)
        candidates += [Path(p).parent for p in listed.stdout.split() if p.endswith(FILES["train"][0])]
    candidates.append(DEFAULT_DIR)
    for folder in candidates:
        if all((folder / f).is_file() for pair in FILES.values() for f in pair):
            return folder
    raise DatasetMissing(
        f"Fashion-MNIST IDX files not found (looked in {', '.join(map(str, dict.fromkeys(candidates)))}); "
        f"hint: apt-get install {PACKAGE}"
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): 2 zero bytes, dtype code 0x08 (uint8), ndim, ndim big-endian uint32 sizes, data."""
    raw = gzip.decompress(path.read_bytes())
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (read_idx(folder / f) for f in FILES[split])
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def write_tree(root: Path, images: np.ndarray, labels: np.ndarray, index: np.ndarray, prefix: str) -> Path:
    """ImageFolder ``root/<class>/<prefix>-<index>.png`` of the given indices; once (``.complete`` marker)."""
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    for i in index:
        folder = root / CLASS_NAMES[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(folder / f"{prefix}-{i:05d}.png")
    done.write_text(f"{len(index)}\n")
    return root


def draw(
    labels: np.ndarray, per_class: int, seed: int, classes: tuple[int, ...] = TARGET_CLASSES
) -> np.ndarray:
    """``per_class`` training indices of each class: a seeded permutation's first ones (nested)."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(chosen))


def tree_files(root: Path) -> list[tuple[Path, str]]:
    return sorted((p, p.parent.name) for p in root.glob("*/*.png"))


def pixels(files: list[tuple[Path, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels / 255 and labels, read back from the PNG files themselves."""
    from PIL import Image

    x = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32).ravel() / 255 for p, _ in files])
    return x, np.array([label for _, label in files])
