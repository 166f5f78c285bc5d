"""Batches from decoded images, and the per-batch transform that runs on the training device.

The loader hands out ``uint8`` batches by indexing the decoded tensor once per batch
(``Dataset.__getitems__``), not image by image. :class:`BatchTransform` then does, on the device
the model is on, what :func:`adaptflow.data.images.train_transform` did per image on the host:
augmentation (per image, with kornia), scaling to ``[0, 1]`` and normalisation. On CUDA the host
only copies bytes (a quarter of the float32 size) into pinned memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adaptflow.config import FinetuneConfig
from adaptflow.contracts import Preprocessing
from adaptflow.training.decoded import DecodedImages
from adaptflow.training.distributed import World, eval_shard, per_rank_batch, train_sampler


class DecodedDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, decoded: DecodedImages) -> None:
        self.images, self.labels = decoded.images, decoded.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return self.images[rows], self.labels[rows]


def whole_batch(batch: Any) -> Any:
    """The collate function: ``__getitems__`` already returns the stacked batch."""
    return batch


def default_workers(decoded: DecodedImages) -> int:
    """In memory, a batch is one indexing op and workers would only add copies between processes.
    Memory-mapped, reading rows may wait on the disk, so a few workers read ahead."""
    if not decoded.memory_mapped:
        return 0
    from adaptflow.cpus import cpu_budget

    return min(4, cpu_budget().cpus)


def decoded_loader(
    decoded: DecodedImages,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int | None = None,
    drop_last: bool = False,
    sampler: Iterable[int] | None = None,
) -> DataLoader[Any]:
    """``sampler``: the indices to draw (e.g. one rank's share); it replaces ``shuffle``."""
    workers = default_workers(decoded) if num_workers is None else num_workers
    cuda = torch.cuda.is_available()
    return DataLoader(
        DecodedDataset(decoded),
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else None,
        sampler=sampler,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        collate_fn=whole_batch,
        drop_last=drop_last,
        pin_memory=cuda,
        persistent_workers=workers > 0,
    )


class BatchTransform(nn.Module):
    """uint8 ``[B, 3, S, S]`` on any device -> normalised float32, augmented in training mode.

    The augmentation is the one :func:`adaptflow.data.images.train_transform` applies (small shifts,
    rotations and scale, nearest-neighbour, black fill), drawn per image from torch's RNG, so a
    checkpoint's RNG state reproduces it. ``augment=False`` (or ``.eval()``) only scales and normalises.
    """

    def __init__(self, pre: Preprocessing, augment: bool = False) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.augment: nn.Module | None = None
        if augment:
            # kornia: per-image random affine on a batch, on the batch's device (torchvision's v2
            # transforms draw one set of parameters per call, i.e. per batch)
            from kornia.augmentation import RandomAffine

            self.augment = RandomAffine(
                degrees=10.0,
                translate=(0.08, 0.08),
                scale=(0.9, 1.1),
                p=1.0,
                resample="nearest",
                padding_mode="zeros",
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255)  # the same operations as ToDtype(scale=True) + Normalize
        if self.augment is not None and self.training:
            x = self.augment(x)
        mean: torch.Tensor = self.mean  # type: ignore[assignment]
        std: torch.Tensor = self.std  # type: ignore[assignment]
        return (x - mean) / std


def eval_batches(pre: Preprocessing) -> BatchTransform:
    return BatchTransform(pre, augment=False).eval()


def train_batches(pre: Preprocessing, augment: bool) -> BatchTransform:
    return BatchTransform(pre, augment=augment).train()


def finetune_train_loader(
    decoded: DecodedImages, cfg: FinetuneConfig, batch_size: int, seed: int, world: World | None = None
) -> DataLoader[Any]:
    """The loader fine-tuning trains from; the cost estimate times the same one."""
    return shuffled_loader(decoded, batch_size, seed, world, num_workers=cfg.num_workers)


def shuffled_loader(
    decoded: DecodedImages,
    batch_size: int,
    seed: int,
    world: World | None = None,
    num_workers: int | None = None,
) -> DataLoader[Any]:
    """Training batches, shuffled per epoch from ``seed`` and the epoch (the loop calls ``set_epoch``).

    ``batch_size`` is the global batch: under torchrun each of the ``world``'s ranks takes its share of
    every batch, so a step trains on the same images for any number of processes."""
    world = world or World()
    per_rank = per_rank_batch(batch_size, world.world_size)
    sampler = train_sampler(len(decoded), seed, world)
    return decoded_loader(
        decoded,
        batch_size=per_rank,
        shuffle=True,
        seed=seed,
        num_workers=num_workers,
        # a trailing batch of one image breaks BatchNorm in train mode (freeze_bn=false, scratch)
        drop_last=len(sampler) % per_rank == 1,
        sampler=sampler,
    )


def eval_loader(decoded: DecodedImages, batch_size: int = 256, world: World | None = None) -> DataLoader[Any]:
    """Evaluation batches in order; with a ``world``, this rank's shard (training/distributed.py)."""
    if world is None or not world.distributed:
        return decoded_loader(decoded, batch_size=batch_size, shuffle=False)
    return decoded_loader(
        decoded, batch_size=batch_size, shuffle=False, sampler=eval_shard(len(decoded), world)
    )
