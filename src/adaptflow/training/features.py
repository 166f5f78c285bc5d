"""Frozen-backbone features, computed once per image and cached on disk.

The cache key is (backbone architecture, weights sha256, preprocessing, image sha256): any change
to the weights or preprocessing is a different cache folder, and a new image costs one forward pass.
Vectors are stored in shards, one per extraction (``FeatureCache``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from adaptflow.contracts import ManifestEntry, Preprocessing
from adaptflow.models.factory import Classifier
from adaptflow.progress import image_progress
from adaptflow.storage import write_atomic
from adaptflow.training.decoded import DecodedImages, entries_key
from adaptflow.training.memory import in_chunks, run_within_memory
from adaptflow.training.shift import BatchNormMoments

log = logging.getLogger(__name__)

#: computed features are written to the cache in shards of about this many images
FLUSH_IMAGES = 8192


@dataclass
class FeatureBatch:
    features: np.ndarray  # [N, D] float32, in the order of the entries given
    computed: int  # images pushed through the backbone by this call
    cached: int
    seconds: float  # spent computing them (transform and forward)

    @property
    def images_per_second(self) -> float | None:
        """Forward throughput measured on the computed images."""
        return self.computed / self.seconds if self.computed and self.seconds > 0 else None

    def followed_by(self, other: FeatureBatch) -> FeatureBatch:
        """This call's features, then ``other``'s (e.g. train, then validation)."""
        return FeatureBatch(
            np.concatenate([f for f in (self.features, other.features) if f.size])
            if self.features.size or other.features.size
            else self.features,
            self.computed + other.computed,
            self.cached + other.cached,
            self.seconds + other.seconds,
        )


def cache_namespace(backbone_name: str, weights_sha256: str, pre: Preprocessing) -> str:
    key = f"{backbone_name}|{weights_sha256}|{pre.model_dump_json()}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class FeatureCache:
    """Feature vectors by image sha256, under ``<root>/<namespace>/shards/``.

    A shard is what one extraction wrote: ``<key>.features.npy`` (``[N, D]`` float32, read
    memory-mapped) and ``<key>.sha256.npy`` (the N image hashes, written last, so a shard without
    it is ignored). One file per image cost more than a third of a 32-px extraction pass (6,430
    atomic writes); a shard is two files per ``FLUSH_IMAGES`` images.
    """

    def __init__(self, root: str | Path, namespace: str) -> None:
        self.dir = Path(root) / namespace
        self._index: dict[str, tuple[Path, int]] | None = None

    def _load_index(self) -> dict[str, tuple[Path, int]]:
        index: dict[str, tuple[Path, int]] = {}
        for names in sorted((self.dir / "shards").glob("*.sha256.npy")):
            try:
                hashes = np.load(names)
            except (OSError, ValueError):
                log.warning("feature cache shard %s is unreadable; its images are computed again", names)
                continue
            vectors = names.with_name(names.name.removesuffix(".sha256.npy") + ".features.npy")
            index.update((str(sha), (vectors, row)) for row, sha in enumerate(hashes))
        return index

    def _entries(self) -> dict[str, tuple[Path, int]]:
        if self._index is None:
            self._index = self._load_index()
        return self._index

    def images(self) -> set[str]:
        """The image hashes with a cached vector."""
        return set(self._entries())

    def lookup(self, sha256s: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached vectors among ``sha256s``; a shard that cannot be read counts as missing."""
        index = self._entries()
        by_shard: dict[Path, list[str]] = {}
        for sha in dict.fromkeys(sha256s):
            if sha in index:
                by_shard.setdefault(index[sha][0], []).append(sha)
        found: dict[str, np.ndarray] = {}
        for path, hashes in by_shard.items():
            try:
                vectors = np.load(path, mmap_mode="r")
                rows = vectors[[index[sha][1] for sha in hashes]]
            except (OSError, ValueError, IndexError):
                log.warning("feature cache shard %s is unreadable; its images are computed again", path)
                continue
            found.update(zip(hashes, np.asarray(rows, dtype=np.float32), strict=True))
        return found

    def put(self, sha256s: Sequence[str], vectors: np.ndarray) -> None:
        """Adds one shard; concurrent runs writing the same images write the same shard."""
        if not sha256s:
            return
        key = hashlib.sha256("".join(sha256s).encode()).hexdigest()[:32]
        shards = self.dir / "shards"
        vectors_path = shards / f"{key}.features.npy"
        write_atomic(vectors_path, lambda handle: np.save(handle, np.ascontiguousarray(vectors)))
        write_atomic(shards / f"{key}.sha256.npy", lambda handle: np.save(handle, np.array(list(sha256s))))
        index = self._entries()
        index.update((sha, (vectors_path, row)) for row, sha in enumerate(sha256s))

    def _shift_path(self, entries: list[ManifestEntry]) -> Path:
        return self.dir / "shift" / f"{entries_key(entries)}.json"

    def get_shift(self, entries: list[ManifestEntry]) -> float | Literal[False] | None:
        """The BatchNorm shift measured on exactly these images (None: no BatchNorm); False if not cached."""
        path = self._shift_path(entries)
        try:
            value = json.loads(path.read_text())["shift"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return None if value is None else float(value)

    def put_shift(self, entries: list[ManifestEntry], value: float | None) -> None:
        write_atomic(
            self._shift_path(entries), lambda handle: handle.write(json.dumps({"shift": value}).encode())
        )


def _flush(cache: FeatureCache, unsaved: dict[str, np.ndarray]) -> None:
    if unsaved:
        cache.put(list(unsaved), np.stack(list(unsaved.values())))
        unsaved.clear()


def _features(model: Classifier, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """The backbone's features of ``x``, ``chunk`` images per forward pass (all at once for None)."""
    with torch.inference_mode():
        return in_chunks(model.features, x, chunk).float().cpu()


def _batches(rows: list[int], size: int) -> list[list[int]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def extract_features(
    model: Classifier,
    entries: list[ManifestEntry],
    decoded: DecodedImages,
    transform: torch.nn.Module,
    cache: FeatureCache,
    device: torch.device,
    batch_size: int = 128,
    moments: BatchNormMoments | None = None,
    moment_rows: list[int] | None = None,
) -> FeatureBatch:
    """Features for ``entries`` (``decoded`` holds their images, in order); only cache misses
    (unique by sha256) run through the backbone, once each.

    With ``moments``, the BatchNorm moments of the images at ``moment_rows`` are collected on the
    way: those go through the backbone first, in batches of their own, and any of them whose
    features were cached go through it for the moments alone (counted in ``computed``).
    """
    out = cache.lookup(e.sha256 for e in entries)
    pending: dict[str, int] = {}
    for row, entry in enumerate(entries):
        if entry.sha256 not in out and entry.sha256 not in pending:
            pending[entry.sha256] = row
    unsaved: dict[str, np.ndarray] = {}  # computed, not yet in a shard
    wanted = list(dict.fromkeys(moment_rows or [])) if moments is not None else []
    first = [r for r in wanted if entries[r].sha256 in pending]  # computed anyway: collect on the way
    again = [r for r in wanted if entries[r].sha256 not in pending]  # cached features: moments only
    in_first = set(first)
    rest = [r for r in pending.values() if r not in in_first]
    work = [(b, True) for b in _batches(first + again, batch_size)] + [
        (b, False) for b in _batches(rest, batch_size)
    ]
    model.eval().to(device)
    transform = transform.to(device).eval()
    seconds, computed = 0.0, 0
    chunk: int | None = None  # images per forward pass; halved on out-of-memory (training/memory.py)
    with image_progress("features", sum(len(b) for b, _ in work)) as bar:
        for rows, collect in work:
            start = time.perf_counter()
            x = transform(decoded.images[torch.as_tensor(rows)].to(device, non_blocking=True))
            if moments is not None:
                moments.collecting = collect
            feats, chunk = run_within_memory(
                functools.partial(_features, model, x), chunk, len(rows), "baseline (features)", device
            )
            seconds += time.perf_counter() - start
            computed += len(rows)
            for row, vector in zip(rows, feats.numpy(), strict=True):
                sha = entries[row].sha256
                if sha in pending and sha not in out:
                    out[sha] = unsaved[sha] = vector
            if len(unsaved) >= FLUSH_IMAGES:  # an interrupted pass keeps what it had computed
                _flush(cache, unsaved)
            bar.advance(len(rows))
    _flush(cache, unsaved)
    if moments is not None:
        moments.collecting = False
    features = np.stack([out[e.sha256] for e in entries]).astype(np.float32) if entries else np.zeros((0, 0))
    log.info(
        "features: %d computed, %d from cache (%s)", len(pending), len(entries) - len(pending), cache.dir
    )
    return FeatureBatch(features, computed, len(entries) - len(pending), seconds)
