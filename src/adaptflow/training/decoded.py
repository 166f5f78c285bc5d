"""Decoded images: each snapshot image decoded, resized and cropped once, kept as ``uint8`` tensors.

Decoding a PNG or JPEG and resizing it costs more than a ResNet-18 step on it at 32 px, so doing it
per image per epoch (the usual ``Dataset.__getitem__``) starves the model. Here a split is decoded
once, by worker processes, and written to
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
from typing import Any

import numpy as np
import torch

from adaptflow.config import Settings
from adaptflow.contracts import ManifestEntry, Preprocessing
from adaptflow.data.images import ImageStore, ResizeCrop
from adaptflow.errors import AdaptflowError
from adaptflow.progress import image_progress
from adaptflow.storage import write_atomic

log = logging.getLogger(__name__)

#: splits up to this size are loaded into memory; larger ones are memory-mapped from the cache file
DEFAULT_MEMORY_LIMIT = 2 << 30
#: images per decoding task
CHUNK = 64


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


class _Decoding(torch.utils.data.Dataset[np.ndarray]):
    """Rows of a split -> their ``uint8`` pixels, a chunk per call; an adaptflow error (a file that
    changed after ingest, an unreachable store) comes back as the batch, so the parent raises it
    whole instead of the DataLoader's re-wrapped traceback."""

    def __init__(self, entries: Sequence[ManifestEntry], store: ImageStore, transform: ResizeCrop) -> None:
        self.entries, self.store, self.transform = entries, store, transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitems__(self, rows: list[int]) -> np.ndarray | AdaptflowError:
        try:
            return np.stack([self.transform(self.store.image(self.entries[row])).numpy() for row in rows])
        except AdaptflowError as error:
            return error


def _as_is(batch: Any) -> Any:
    return batch


def decode_all(
    entries: Sequence[ManifestEntry], pre: Preprocessing, store: ImageStore, workers: int | None = None
) -> np.ndarray:
    """``[N, 3, S, S]`` uint8, decoded by ``workers`` processes (default: the CPUs the process may use,
    one chunk of ``CHUNK`` images at a time; in this process when that is one).

    Processes, through torch's DataLoader, because decoding a small image is mostly Python, which
    threads serialise on the GIL: 6,000 28-px PNGs took 0.13 ms each on 2 worker processes, 0.16 ms
    in one thread and 0.39 ms in 2 threads (2 cores). For 500x375 JPEGs, whose decoding releases the
    GIL, 2 processes took 1.6 ms and 2 threads 1.5 ms against 2.6 ms in one.
    """
    from adaptflow.cpus import cpu_budget

    out = np.empty((len(entries), 3, pre.input_size, pre.input_size), dtype=np.uint8)
    chunks = -(-len(entries) // CHUNK)
    processes = min(workers or cpu_budget().cpus, chunks)
    loader = torch.utils.data.DataLoader(
        _Decoding(entries, store, ResizeCrop(pre)),
        batch_size=CHUNK,
        num_workers=processes if processes > 1 else 0,
        collate_fn=_as_is,
    )
    with image_progress("decode", len(entries)) as bar:
        row = 0
        for batch in loader:
            if isinstance(batch, AdaptflowError):
                raise batch
            out[row : row + len(batch)] = batch
            row += len(batch)
            bar.advance(len(batch))
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
