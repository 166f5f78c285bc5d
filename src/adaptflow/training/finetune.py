"""The fine-tuning stage: LP-FT from the baseline candidate, early stopping on validation."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from adaptflow.config import FinetuneConfig
from adaptflow.contracts import BaselineResult, Candidate, Preprocessing, Snapshot
from adaptflow.data.images import ImageStore
from adaptflow.errors import ConfigError
from adaptflow.logs import console
from adaptflow.models.factory import count_parameters
from adaptflow.signals import StopRequest
from adaptflow.training.batches import eval_batches, eval_loader, finetune_train_loader, train_batches
from adaptflow.training.candidates import load_candidate, save_candidate
from adaptflow.training.checkpoint import Checkpointer
from adaptflow.training.decoded import decode_split
from adaptflow.training.distributed import World, training_world
from adaptflow.training.loop import fit
from adaptflow.training.runtime import pick_device, reset_peak_memory, seed_everything
from adaptflow.training.schedule import schedule_from_signals
from adaptflow.training.strategies import (
    freeze_batchnorm,
    freeze_frozen_batchnorm,
    plan_strategy,
    schedule_epochs,
)

if TYPE_CHECKING:
    from adaptflow.training.shard_loader import ShardLoader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneInputs:
    snapshot: Snapshot
    baseline: BaselineResult
    baseline_candidate_dir: Path
    cfg: FinetuneConfig
    seed: int = 0
    checkpointer: Checkpointer | None = None  # resume from, and write, this checkpoint
    stop: StopRequest | None = None  # set by SIGTERM: checkpoint and stop
    decoded_cache_dir: Path | None = None  # decoded images the baseline wrote (training/decoded.py)


def shard_loaders(
    inputs: FinetuneInputs, pre: Preprocessing, batch_size: int, store: ImageStore, distributed: bool
) -> tuple[ShardLoader, ShardLoader]:
    """Train and validation loaders streaming the snapshot's shards (``finetune.data_source: shards``).

    The shard step wrote them (a HEAD per shard finds them); without it they are written here.
    """
    from adaptflow.cpus import cpu_budget
    from adaptflow.data.shards import write_split_shards
    from adaptflow.training.shard_loader import shard_loader

    cfg = inputs.cfg
    if distributed:  # ranks reading shards[rank::world] get unequal step counts, and DDP's collectives hang
        raise ConfigError(
            "finetune.data_source=shards does not run under several processes yet",
            hint="use finetune.data_source=decoded with cluster.finetune.gpus or nodes > 1, or train from "
            "shards in one process (its DataLoader workers each stream their own shards)",
        )
    train, val = write_split_shards(inputs.snapshot, cfg, store)
    cache_dir = Path(cfg.shard_cache_dir or (inputs.decoded_cache_dir or Path("cache/decoded")) / "shards")
    workers = cfg.num_workers if cfg.num_workers is not None else min(4, cpu_budget().cpus)
    common = {"seed": inputs.seed, "num_workers": workers}
    return (
        shard_loader(
            train, pre, cache_dir, cfg.shard_cache_bytes, batch_size=batch_size, shuffle=True, **common
        ),
        shard_loader(val, pre, cache_dir, cfg.shard_cache_bytes, batch_size=256, shuffle=False, **common),
    )


def run_finetune(inputs: FinetuneInputs, out_dir: str | Path, store: ImageStore | None = None) -> Candidate:
    """Fine-tunes from the baseline candidate and saves the candidate under ``out_dir``.

    Under torchrun every rank trains its share of each batch (training/distributed.py); rank 0 alone
    writes the checkpoint and the candidate, and every rank returns the same candidate record.
    """
    with training_world(pick_device(inputs.cfg.device)) as (world, device):
        return _run_finetune(inputs, out_dir, store, world, device)


def _run_finetune(
    inputs: FinetuneInputs, out_dir: str | Path, store: ImageStore | None, world: World, device: torch.device
) -> Candidate:
    start = time.perf_counter()
    cfg, snapshot = inputs.cfg, inputs.snapshot
    seed_everything(inputs.seed)
    store = store or ImageStore()
    reset_peak_memory(device)
    base, model = load_candidate(inputs.baseline_candidate_dir)  # LP-FT: start from the probe's head
    plan = plan_strategy(model, cfg)
    model.to(device)
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    pre, classes = base.preprocessing, base.class_names
    train_images = len(snapshot.split("train"))
    schedule = schedule_from_signals(train_images, cfg, inputs.baseline.decision.signals)
    log.info(
        "finetune-%s: batch %d, up to %d epochs (%s), patience %d",
        cfg.strategy,
        schedule.batch_size,
        schedule.epochs,
        schedule.why,
        schedule.patience,
    )
    on_epoch_start = plan.on_epoch_start
    train_loader: DataLoader[Any]
    val_loader: DataLoader[Any]
    if cfg.data_source == "shards":
        # each loader worker streams its own shards into the bounded decoded-shard cache
        shards, val_loader = shard_loaders(inputs, pre, schedule.batch_size, store, world.distributed)
        train_loader = shards

        def on_epoch_start(epoch: int) -> None:  # the epoch's shard order: a resumed run replays it
            shards.set_epoch(epoch)
            if plan.on_epoch_start is not None:
                plan.on_epoch_start(epoch)

    else:
        train = decode_split(snapshot.split("train"), classes, pre, store, inputs.decoded_cache_dir)
        val = decode_split(snapshot.split("val"), classes, pre, store, inputs.decoded_cache_dir)
        train_loader = finetune_train_loader(train, cfg, schedule.batch_size, inputs.seed, world)
        val_loader = eval_loader(val, world=world)
    if world.distributed:
        # each rank draws its own augmentation (the model is the same: DDP copies rank 0's weights)
        seed_everything(inputs.seed + world.rank)
    # fused on CUDA: one kernel for the update, and a non-finite step is skipped without a host read
    optimizer = torch.optim.AdamW(
        plan.param_groups, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=schedule.epochs)
    trainable, total = count_parameters(model)
    loop = fit(
        model,
        train_loader,
        val_loader,
        optimizer,
        epochs=schedule.epochs,
        patience=schedule.patience,
        device=device,
        amp=cfg.amp,
        channels_last=channels_last,
        scheduler=scheduler,
        on_epoch_start=on_epoch_start,
        train_mode=freeze_batchnorm if cfg.freeze_bn else freeze_frozen_batchnorm,
        label=f"finetune-{cfg.strategy}",
        min_epochs=schedule_epochs(model, cfg),
        checkpointer=inputs.checkpointer,
        stop=inputs.stop,
        train_transform=train_batches(pre, cfg.augment),
        val_transform=eval_batches(pre),
        compile_model=cfg.compile,
        accumulation_steps=cfg.accumulation_steps,
    )
    if plan.finalize is not None:
        plan.finalize()
        total = count_parameters(model)[1]  # e.g. LoRA adapters merged away: the exported network's size
    if cfg.strategy == "gradual":
        trainable = count_parameters(model)[0]  # what the schedule had unfrozen by the last epoch
    metrics = (
        loop.best_metrics()
        if loop.history and loop.best_epoch
        # diverged in its first epoch: the weights are the baseline's, and so are the metrics
        else {k: base.metrics[k] for k in ("train_accuracy", "val_accuracy", "val_loss") if k in base.metrics}
    )
    candidate = Candidate(
        name=f"finetune-{cfg.strategy}",
        strategy=cfg.strategy,
        backbone=base.backbone,
        backbone_sha256=base.backbone_sha256,
        class_names=classes,
        preprocessing=pre,
        metrics={**metrics, "baseline_val_accuracy": base.metrics["val_accuracy"]},
        cost=loop.cost(start, device, params=(trainable, total), backbone_forward_images=loop.train_images),
        history=tuple(loop.history),
        extra={
            "best_epoch": str(loop.best_epoch),
            "freeze_bn": str(cfg.freeze_bn),
            **{key: str(value) for key, value in schedule.as_dict().items()},
            **({"resumed_from": "epoch {} step {}".format(*loop.resumed_from)} if loop.resumed_from else {}),
            **({Candidate.DIVERGED: loop.diverged} if loop.diverged else {}),
        },
    )
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    if not world.is_main:
        return candidate
    save_candidate(candidate, model.cpu(), out_dir)
    if inputs.checkpointer is not None:
        inputs.checkpointer.remove()  # the candidate is saved: a rerun of this work starts afresh
    console().info(
        "finetune-%s: best val acc %.4f at epoch %d (baseline %.4f), %d trainable params, %.0fs",
        cfg.strategy,
        candidate.metrics["val_accuracy"],
        loop.best_epoch,
        base.metrics["val_accuracy"],
        trainable,
        candidate.cost.wall_seconds,
    )
    return candidate
