"""The fine-tuning stage: LP-FT from the baseline candidate, early stopping on validation."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptflow.config import FinetuneConfig
from adaptflow.contracts import BaselineResult, Candidate, Snapshot
from adaptflow.data.images import ImageStore
from adaptflow.logs import console
from adaptflow.models.factory import count_parameters
from adaptflow.signals import StopRequest
from adaptflow.training.batches import eval_batches, eval_loader, finetune_train_loader, train_batches
from adaptflow.training.candidates import load_candidate, save_candidate
from adaptflow.training.checkpoint import Checkpointer
from adaptflow.training.decoded import decode_split
from adaptflow.training.loop import fit
from adaptflow.training.runtime import pick_device, reset_peak_memory, seed_everything
from adaptflow.training.schedule import schedule_from_signals
from adaptflow.training.strategies import (
    freeze_batchnorm,
    freeze_frozen_batchnorm,
    plan_strategy,
    schedule_epochs,
)

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


def run_finetune(inputs: FinetuneInputs, out_dir: str | Path, store: ImageStore | None = None) -> Candidate:
    start = time.perf_counter()
    cfg, snapshot = inputs.cfg, inputs.snapshot
    seed_everything(inputs.seed)
    store = store or ImageStore()
    device = pick_device(cfg.device)
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
    train = decode_split(snapshot.split("train"), classes, pre, store, inputs.decoded_cache_dir)
    val = decode_split(snapshot.split("val"), classes, pre, store, inputs.decoded_cache_dir)
    train_loader = finetune_train_loader(train, cfg, schedule.batch_size, inputs.seed)
    # fused on CUDA: one kernel for the update, and a non-finite step is skipped without a host read
    optimizer = torch.optim.AdamW(
        plan.param_groups, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=schedule.epochs)
    trainable, total = count_parameters(model)
    loop = fit(
        model,
        train_loader,
        eval_loader(val),
        optimizer,
        epochs=schedule.epochs,
        patience=schedule.patience,
        device=device,
        amp=cfg.amp,
        channels_last=channels_last,
        scheduler=scheduler,
        on_epoch_start=plan.on_epoch_start,
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
