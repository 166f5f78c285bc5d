"""DataLoaders over snapshot entries."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from adaptflow.config import FinetuneConfig
from adaptflow.contracts import ManifestEntry, Preprocessing
from adaptflow.data.images import ImageStore, ManifestDataset, eval_transform, train_transform


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


def finetune_train_loader(
    entries: list[ManifestEntry],
    class_names: tuple[str, ...],
    pre: Preprocessing,
    store: ImageStore,
    cfg: FinetuneConfig,
    batch_size: int,
    seed: int,
) -> DataLoader:
    """The loader fine-tuning trains from; the cost estimate times the same one."""
    return make_loader(
        entries,
        class_names,
        train_transform(pre) if cfg.augment else eval_transform(pre),
        store,
        batch_size=batch_size,
        shuffle=True,
        seed=seed,
        num_workers=cfg.num_workers,
        # a trailing batch of one image breaks BatchNorm in train mode (freeze_bn=false, scratch)
        drop_last=len(entries) % batch_size == 1,
    )
