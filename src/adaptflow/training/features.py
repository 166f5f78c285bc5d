"""Frozen-backbone features, computed once per image and cached on disk.

The cache key is (backbone architecture, weights sha256, preprocessing, image sha256): any change
to the weights or preprocessing is a different cache folder, and a new image costs one forward pass.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
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
    def __init__(self, root: str | Path, namespace: str) -> None:
        self.dir = Path(root) / namespace

    def _path(self, sha256: str) -> Path:
        return self.dir / sha256[:2] / f"{sha256}.npy"

    def get(self, sha256: str) -> np.ndarray | None:
        path = self._path(sha256)
        if not path.exists():
            return None
        try:
            return np.load(path)
        except (OSError, ValueError):
            log.warning("feature cache entry %s is unreadable; recomputing", path)
            return None

    def put(self, sha256: str, vector: np.ndarray) -> None:
        write_atomic(self._path(sha256), lambda handle: np.save(handle, vector))  # concurrent runs share it

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
    out: dict[str, np.ndarray] = {}
    pending: dict[str, int] = {}
    for row, entry in enumerate(entries):
        if entry.sha256 in out or entry.sha256 in pending:
            continue
        hit = cache.get(entry.sha256)
        if hit is None:
            pending[entry.sha256] = row
        else:
            out[entry.sha256] = hit
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
                    cache.put(sha, vector)
                    out[sha] = vector
            bar.advance(len(rows))
    if moments is not None:
        moments.collecting = False
    features = np.stack([out[e.sha256] for e in entries]).astype(np.float32) if entries else np.zeros((0, 0))
    log.info(
        "features: %d computed, %d from cache (%s)", len(pending), len(entries) - len(pending), cache.dir
    )
    return FeatureBatch(features, computed, len(entries) - len(pending), seconds)
