"""Decoded images: each snapshot image decoded, resized and cropped once, kept as ``uint8`` tensors.

Decoding a PNG or JPEG and resizing it costs more than a ResNet-18 step on it at 32 px, so doing it
per image per epoch (the usual ``Dataset.__getitem__``) starves the model. Here a split is decoded
once, in a thread pool, and written to
``<cache>/<namespace>/<key>.npy``: the namespace is the preprocessing's resize, crop and
interpolation; the key is the ordered image sha256s. The baseline stage writes it and the
fine-tuning stage, a separate process, reads it. A split that fits ``memory_limit_bytes`` is loaded
into memory; a larger one is memory-mapped, so the page cache holds what it can.

What stays per batch (on the training device) is in :mod:`adaptflow.training.batches`: augmentation,
scaling to float and normalisation.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adaptflow.config import Settings
from adaptflow.contracts import ManifestEntry, Preprocessing
from adaptflow.data.images import ImageStore, resize_crop
from adaptflow.progress import image_progress
from adaptflow.storage import write_atomic

log = logging.getLogger(__name__)

#: splits up to this size are loaded into memory; larger ones are memory-mapped from the cache file
DEFAULT_MEMORY_LIMIT = 2 << 30


@dataclass(frozen=True)
class DecodedImages:
    """One split's images as ``[N, 3, S, S]`` uint8 and their class indices, in the entries' order."""

    images: torch.Tensor
    labels: torch.Tensor
    memory_mapped: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: slice | Sequence[int]) -> DecodedImages:
        if isinstance(index, slice):
            return DecodedImages(self.images[index], self.labels[index], self.memory_mapped)
        rows = torch.as_tensor(list(index), dtype=torch.long)
        return DecodedImages(self.images[rows], self.labels[rows], self.memory_mapped)


def decoded_namespace(pre: Preprocessing) -> str:
    """What decides a decoded image's pixels: resize, crop and interpolation (not mean/std)."""
    key = f"{pre.resize_size}|{pre.input_size}|{pre.interpolation}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def entries_key(entries: Sequence[ManifestEntry]) -> str:
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(entry.sha256.encode())
    return digest.hexdigest()[:32]


def decode_all(
    entries: Sequence[ManifestEntry], pre: Preprocessing, store: ImageStore, threads: int | None = None
) -> np.ndarray:
    """``[N, 3, S, S]`` uint8, decoded by ``threads`` threads (default: the CPUs the process may use).

    torch runs single-threaded meanwhile: a small image's resize split across OpenMP threads, from
    several decoding threads at once, ran 2.6x slower than on one (0.74 against 0.28 ms per 28-px
    image, 2 cores). PIL's decoding and torch's ops release the GIL; the Python around them does not,
    so threads give what they can (0.41 against 0.48 ms with 2 threads) and processes gave less
    (their start-up and the results' trip back cost more than the decoding).
    """
    from concurrent.futures import ThreadPoolExecutor

    from adaptflow.cpus import cpu_budget

    out = np.empty((len(entries), 3, pre.input_size, pre.input_size), dtype=np.uint8)
    transform = resize_crop(pre)

    def decode(row: int) -> None:
        out[row] = transform(store.image(entries[row])).numpy()

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with (
            ThreadPoolExecutor(max_workers=threads or cpu_budget().cpus, thread_name_prefix="decode") as pool,
            image_progress("decode", len(entries)) as bar,
        ):
            for start in range(0, len(entries), 256):
                rows = range(start, min(start + 256, len(entries)))
                for _ in pool.map(decode, rows):
                    pass
                bar.advance(len(rows))
    finally:
        torch.set_num_threads(torch_threads)
    return out


def _load(path: Path, memory_limit: int) -> tuple[np.ndarray, bool] | None:
    try:
        # copy-on-write mapping: a writable array torch can wrap without copying it
        mapped = np.load(path, mmap_mode="c")
        if mapped.nbytes <= memory_limit:
            return np.array(mapped), False
        return mapped, True
    except (OSError, ValueError):
        log.warning("decoded image cache %s is unreadable; decoding again", path)
        return None


def decode_split(
    entries: Sequence[ManifestEntry],
    class_names: Sequence[str],
    pre: Preprocessing,
    store: ImageStore,
    cache_dir: str | Path | None = None,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
) -> DecodedImages:
    """The split decoded once: from ``cache_dir`` when an earlier stage wrote it, else decoded now
    (and written there). Without ``cache_dir`` it is decoded in memory only."""
    index = {name: i for i, name in enumerate(class_names)}
    labels = torch.tensor([index[e.label] for e in entries], dtype=torch.long)
    path = (
        Path(cache_dir) / decoded_namespace(pre) / f"{entries_key(entries)}.npy"
        if cache_dir is not None
        else None
    )
    loaded = _load(path, memory_limit) if path is not None and path.exists() else None
    if loaded is not None and loaded[0].shape == (len(entries), 3, pre.input_size, pre.input_size):
        array, mapped = loaded
        log.info("decoded images: %d from %s%s", len(entries), path, " (memory-mapped)" if mapped else "")
    else:
        array, mapped = decode_all(entries, pre, store), False
        if path is not None:
            write_atomic(path, lambda handle: np.save(handle, array))  # a concurrent stage never reads half
            if array.nbytes > memory_limit:  # keep only the mapping, not a second copy in memory
                array, mapped = np.load(path, mmap_mode="c"), True
    return DecodedImages(torch.from_numpy(array), labels, mapped)


def decoded_cache_dir(settings: Settings) -> Path:
    """Beside the feature cache: ``<workdir>/cache/decoded`` unless the feature cache was moved."""
    features = settings.baseline.feature_cache_dir
    root = Path(features).parent if features else Path(settings.workdir).resolve() / "cache"
    return root / "decoded"
