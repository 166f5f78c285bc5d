"""Source-task pretraining: makes the "pretrained" backbone that demos and tests load.

With no hub reachable, we pretrain here on a source task (digits 0-4) and write the weights
like a torchvision mirror file: a state dict of the plain torchvision architecture, as
safetensors with adaptflow metadata in the header (or .pth), plus ``<file>.json`` with its sha256.
The metadata also carries the source feature statistics, the advisor's domain-shift reference.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptflow.config import IngestConfig
from adaptflow.contracts import Preprocessing
from adaptflow.cpus import configure_threads
from adaptflow.data.images import ImageStore
from adaptflow.data.ingest import ingest
from adaptflow.logs import console
from adaptflow.models.factory import build_torchvision
from adaptflow.models.weights import save_weights_file
from adaptflow.training.batches import eval_batches, eval_loader, shuffled_loader, train_batches
from adaptflow.training.decoded import decode_split
from adaptflow.training.distributed import World, from_main, training_world
from adaptflow.training.loop import evaluate_loader, fit
from adaptflow.training.runtime import pick_device, seed_everything

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainResult:
    weights_path: Path
    sha256: str
    source_val_accuracy: float
    source_test_accuracy: float
    seconds: float
    meta: dict[str, object]


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of decoded uint8 training images, scaled to [0, 1]."""
    stack = images.float() / 255
    mean = stack.mean(dim=(0, 2, 3)).tolist()
    std = stack.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return tuple(round(m, 6) for m in mean), tuple(round(s, 6) for s in std)


def pretrain(
    data_dir: str | Path,
    backbone: str,
    out_file: str | Path,
    *,
    input_size: int = 32,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "auto",
) -> PretrainResult:
    """Trains ``backbone`` on the source task in ``data_dir`` and writes its weights file.

    Under torchrun the ranks share each batch of ``batch_size`` (training/distributed.py) and rank 0
    alone writes the file; every rank returns the same result.
    """
    with training_world(pick_device(device)) as (world, dev):
        return _pretrain(data_dir, backbone, out_file, world, dev, input_size, epochs, batch_size, lr, seed)


def _pretrain(
    data_dir: str | Path,
    backbone: str,
    out_file: str | Path,
    world: World,
    dev: torch.device,
    input_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> PretrainResult:
    start = time.perf_counter()
    if not world.distributed:  # under torchrun the launcher sized each process's threads
        configure_threads()
    seed_everything(seed)
    snapshot = ingest(str(data_dir), IngestConfig())
    store = ImageStore()
    classes = snapshot.class_names
    sized = Preprocessing(input_size=input_size, resize_size=input_size, mean=(0, 0, 0), std=(1, 1, 1))
    decoded = {
        name: decode_split(snapshot.split(name), classes, sized, store) for name in ("train", "val", "test")
    }
    mean, std = channel_stats(decoded["train"].images)
    pre = sized.model_copy(update={"mean": mean, "std": std})

    net = build_torchvision(backbone, num_classes=len(classes)).to(dev)
    loader = shuffled_loader(decoded["train"], batch_size, seed, world)
    if world.distributed:
        seed_everything(seed + world.rank)  # each rank its own augmentation; DDP copies rank 0's weights
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    result = fit(
        net,
        loader,
        eval_loader(decoded["val"], world=world),
        optimizer,
        epochs=epochs,
        patience=epochs,
        device=dev,
        scheduler=scheduler,
        label="pretrain",
        train_transform=train_batches(pre, augment=True),
        val_transform=eval_batches(pre),
    )
    _, test_acc = evaluate_loader(
        net, eval_loader(decoded["test"]), dev, amp=False, transform=eval_batches(pre)
    )

    meta: dict[str, object] = {
        "architecture": backbone,
        "preprocessing": pre.model_dump(mode="json"),
        "source_classes": list(classes),
        "source_fingerprint": snapshot.fingerprint,
        "source_val_accuracy": round(result.best_val_accuracy, 6),
        "source_test_accuracy": round(test_acc, 6),
        "epochs": len(result.history),
        "seed": seed,
    }
    out = Path(out_file)
    sha = ""
    if world.is_main:
        sha = save_weights_file(net.state_dict(), out, meta)
        sidecar = {
            "file": out.name,
            "sha256": sha,
            **meta,
        }
        out.with_name(out.name + ".json").write_text(json.dumps(sidecar, indent=2))
    sha = from_main(sha)
    seconds = time.perf_counter() - start
    if not world.is_main:
        return PretrainResult(out, sha, result.best_val_accuracy, test_acc, seconds, meta)
    console().info(
        "pretrain: %s val acc %.4f test acc %.4f sha256 %s (%.0fs)",
        out,
        result.best_val_accuracy,
        test_acc,
        sha[:12],
        seconds,
    )
    return PretrainResult(out, sha, result.best_val_accuracy, test_acc, seconds, meta)
