"""DataLoaders over snapshot entries."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from adaptflow.contracts import ManifestEntry
from adaptflow.data.images import ImageStore, ManifestDataset


def make_loader(
    entries: list[ManifestEntry],
    class_names: tuple[str, ...],
    transform: v2.Compose,
    store: ImageStore,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    dataset = ManifestDataset(entries, class_names, transform, store)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
