"""Frozen-backbone features, computed once per image and cached on disk.

The cache key is (backbone architecture, weights sha256, preprocessing, image sha256): any change
to the weights or preprocessing is a different cache folder, and a new image costs one forward pass.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adaptflow.contracts import ManifestEntry, Preprocessing
from adaptflow.data.images import ImageStore, eval_transform
from adaptflow.models.factory import Classifier
from adaptflow.progress import track
from adaptflow.training.memory import in_chunks, run_within_memory

log = logging.getLogger(__name__)


@dataclass
class FeatureBatch:
    features: np.ndarray  # [N, D] float32, in the order of the entries given
    computed: int  # images pushed through the backbone by this call
    cached: int
    images_per_second: float | None  # forward throughput measured on the computed images


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
        path = self._path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.partial")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, vector)
            os.replace(tmp, path)  # atomic: concurrent runs never see half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _features(model: Classifier, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """The backbone's features of ``x``, ``chunk`` images per forward pass (all at once for None)."""
    with torch.inference_mode():
        return in_chunks(model.features, x, chunk).float().cpu()


def extract_features(
    model: Classifier,
    entries: list[ManifestEntry],
    pre: Preprocessing,
    cache: FeatureCache,
    store: ImageStore,
    device: torch.device,
    batch_size: int = 128,
) -> FeatureBatch:
    """Features for ``entries``; only cache misses (unique by sha256) run through the backbone."""
    out: dict[str, np.ndarray] = {}
    pending: dict[str, ManifestEntry] = {}
    for entry in entries:
        if entry.sha256 in out or entry.sha256 in pending:
            continue
        hit = cache.get(entry.sha256)
        if hit is None:
            pending[entry.sha256] = entry
        else:
            out[entry.sha256] = hit
    missing = list(pending.values())
    transform = eval_transform(pre)
    model.eval().to(device)
    seconds = 0.0
    batches = [missing[i : i + batch_size] for i in range(0, len(missing), batch_size)]
    chunk: int | None = None  # images per forward pass; halved on out-of-memory (training/memory.py)
    for batch in track(batches, total=len(batches), description="features"):
        x = torch.stack([transform(store.image(e)) for e in batch]).to(device)
        start = time.perf_counter()
        computed, chunk = run_within_memory(
            functools.partial(_features, model, x), chunk, len(batch), "baseline (features)", device
        )
        feats = computed.numpy()
        seconds += time.perf_counter() - start
        for entry, vector in zip(batch, feats, strict=True):
            cache.put(entry.sha256, vector)
            out[entry.sha256] = vector
    features = np.stack([out[e.sha256] for e in entries]).astype(np.float32) if entries else np.zeros((0, 0))
    rate = len(missing) / seconds if missing and seconds > 0 else None
    log.info(
        "features: %d computed, %d from cache (%s)", len(missing), len(entries) - len(missing), cache.dir
    )
    return FeatureBatch(features, len(missing), len(entries) - len(missing), rate)
