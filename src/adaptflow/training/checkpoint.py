"""Resumable training: atomic checkpoints, the state a resumed run needs, and a graceful SIGTERM.

A checkpoint holds everything that decides the rest of a run: the model, optimizer and scheduler,
the best weights so far, the loop's counters and history, every RNG, and the shuffling generator's
state at the start of the epoch (the data order). Resuming mid-epoch replays that epoch's first
batches through the loader without training on them, so the order and the augmentation draws that
follow are the ones the uninterrupted run saw (exactly so with ``num_workers=0``).

The file is written to a temporary name and renamed, so a kill mid-write leaves the previous
checkpoint whole; it is loaded with ``weights_only=True``, so it holds only tensors and plain data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from adaptflow.contracts import EpochRecord
from adaptflow.errors import Interrupted

if TYPE_CHECKING:
    from adaptflow.config import FinetuneConfig, Settings

log = logging.getLogger(__name__)

FORMAT = 1


class Preempted(Interrupted):
    """SIGTERM arrived during training: the stage wrote its checkpoint and stops. A rerun resumes."""


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors and plain data (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "python": [version, list(python_state), gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))


# --------------------------------------------------------------------------- the loop's state


@dataclass
class LoopProgress:
    """The loop's counters: with the weights, optimizer and RNGs, what a checkpoint must restore."""

    epoch: int = 1  # the epoch in progress (1-based)
    step: int = 0  # batches of that epoch already trained on
    global_step: int = 0
    best_accuracy: float = -1.0
    best_loss: float = float("inf")
    best_epoch: int = 0
    stale: int = 0
    images: int = 0
    train_seconds: float = 0.0
    loss_sum: float = 0.0  # of the epoch in progress
    correct: int = 0
    seen: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return dict(vars(self))


def loop_state(
    progress: LoopProgress,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    best_state: dict[str, torch.Tensor],
    history: list[EpochRecord],
    epoch_rng: dict[str, Any],
) -> dict[str, Any]:
    return {
        "epoch": progress.epoch,
        "step": progress.step,
        "progress": progress.as_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "best_state": best_state,
        "history": [r.model_dump(mode="json") for r in history],
        "rng": rng_state(),
        "epoch_rng": epoch_rng,
    }


def epoch_rng_state(loader: DataLoader) -> dict[str, Any]:
    """What decides an epoch's data order and augmentation: the shuffling generator and the RNGs."""
    generator = loader.generator if isinstance(loader.generator, torch.Generator) else None
    return {"loader": generator.get_state() if generator is not None else None, "rng": rng_state()}


def replay_epoch_start(loader: DataLoader, epoch_rng: dict[str, Any], steps: int) -> Iterator[Any]:
    """The epoch's iterator, advanced past the ``steps`` batches trained before the checkpoint."""
    if epoch_rng["loader"] is not None and isinstance(loader.generator, torch.Generator):
        loader.generator.set_state(epoch_rng["loader"])
    set_rng_state(epoch_rng["rng"])
    batches = iter(loader)
    for _ in range(steps):
        next(batches)
    return batches


# --------------------------------------------------------------------------- the file


@dataclass
class Checkpointer:
    """Where one training run's checkpoint lives and how often it is written.

    ``every_steps``: also write mid-epoch every that many optimizer steps (0: at epoch ends only).
    ``min_seconds``: skip an epoch-end write when the last one is younger (tiny epochs would spend
    more time writing than training); a mid-epoch or SIGTERM write is never skipped.
    ``identity``: what the run is (data fingerprint, config hash, strategy); a checkpoint of
    another run found at the path is ignored rather than resumed.
    ``mirror``: an ``s3://`` URI the file is uploaded to after each write and fetched from when the
    local file is missing. An upload that fails is logged, and training goes on.
    """

    path: Path
    identity: str
    every_steps: int = 0
    min_seconds: float = 0.0
    mirror: str | None = None  # s3:// copy, for a retried pod on a fresh disk
    _last_write: float = field(default=float("-inf"), repr=False)

    def due(self, global_step: int, epoch_end: bool) -> bool:
        if epoch_end:
            return time.monotonic() - self._last_write >= self.min_seconds
        return self.every_steps > 0 and global_step % self.every_steps == 0

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        torch.save({"format": FORMAT, "identity": self.identity, **state}, tmp)
        os.replace(tmp, self.path)  # atomic: a kill mid-write leaves the previous checkpoint
        self._last_write = time.monotonic()
        if self.mirror:
            self._upload()
        log.debug("checkpoint written: %s (epoch %s, step %s)", self.path, state["epoch"], state["step"])

    def load(self) -> dict[str, Any] | None:
        """The saved state of this run, or None (no file, another run's, or an unreadable one)."""
        if not self.path.is_file() and not (self.mirror and self._download()):
            return None
        try:
            state: dict[str, Any] = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # a torn or foreign file must not stop a run: start over
            log.warning("ignoring unreadable checkpoint %s: %s", self.path, error)
            return None
        if state.get("format") != FORMAT or state.get("identity") != self.identity:
            log.warning("ignoring checkpoint %s: it belongs to another run or format", self.path)
            return None
        return state

    def remove(self) -> None:
        """After the stage's output is saved, the checkpoint has done its job."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self.mirror:
            from adaptflow.storage import s3_client, split_s3

            bucket, key = split_s3(self.mirror)
            with contextlib.suppress(Exception):
                s3_client().delete_object(Bucket=bucket, Key=key)

    def _upload(self) -> None:
        from adaptflow.storage import s3_client, split_s3

        assert self.mirror is not None
        bucket, key = split_s3(self.mirror)
        try:  # one PUT or a multipart upload: either way the object appears whole or not at all
            s3_client().upload_file(str(self.path), bucket, key)
        except Exception as error:
            log.warning("checkpoint not mirrored to %s (training goes on): %s", self.mirror, error)

    def _download(self) -> bool:
        from adaptflow.errors import StoreError
        from adaptflow.storage import download_to

        assert self.mirror is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".download")
        try:
            download_to(self.mirror, partial)
        except StoreError:  # no checkpoint there (or unreachable): start from the beginning
            partial.unlink(missing_ok=True)
            return False
        os.replace(partial, self.path)
        log.info("checkpoint fetched from %s", self.mirror)
        return True


# --------------------------------------------------------------------------- where a stage keeps it

#: set by the local runner (``<workdir>/checkpoints``); stage subprocesses inherit it
CHECKPOINT_ROOT_ENV = "ADAPTFLOW_CHECKPOINT_ROOT"


def stage_checkpointer(
    stage: str,
    identity: str,
    *,
    pipeline_root: str | None,
    scratch_dir: Path,
    every_steps: int = 0,
    min_seconds: float = 0.0,
) -> Checkpointer:
    """The checkpoint of one training stage, found again by a rerun or a retried task.

    The file is named by ``identity`` (data fingerprint, config hash, strategy, seed): the same work
    finds the same file. Locally it lives under ``$ADAPTFLOW_CHECKPOINT_ROOT``; on a cluster,
    where a retried pod starts on a fresh disk, it is written to ``scratch_dir`` and mirrored to
    ``<pipeline_root>/checkpoints/`` on S3.
    """
    import hashlib

    name = f"{stage}-{hashlib.sha256(identity.encode()).hexdigest()[:20]}.pt"
    root = os.environ.get(CHECKPOINT_ROOT_ENV)
    mirror = None
    if root is None and pipeline_root and pipeline_root.startswith("s3://"):
        mirror = f"{pipeline_root.rstrip('/')}/checkpoints/{name}"
    folder = Path(root) if root else scratch_dir
    return Checkpointer(folder / name, identity, every_steps, min_seconds, mirror=mirror)


def finetune_checkpointer(
    settings: Settings, cfg: FinetuneConfig, fingerprint: str, out_dir: Path
) -> Checkpointer:
    """The finetune stage's checkpoint, for the stage's step and each of its distributed workers.

    The same data, config, strategy and seed find the same file, so a rerun or a retried task resumes;
    the number of processes is not part of it (a step is one global batch for any number of them).
    """
    identity = f"{fingerprint}|{settings.config_hash()}|{cfg.strategy}|{settings.seed}"
    return stage_checkpointer(
        "finetune",
        identity,
        pipeline_root=settings.cluster.pipeline_root,
        scratch_dir=Path(out_dir).parent / "checkpoint",
        every_steps=cfg.checkpoint_every_steps,
        min_seconds=cfg.checkpoint_min_seconds,
    )
