"""The supervised loop used by pretraining and fine-tuning: epochs, validation, early stopping.

The best weights (by validation accuracy, ties broken by lower validation loss) are kept and
restored at the end, so a late overfitting epoch never becomes the candidate.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from adaptflow.contracts import CostFigures, EpochRecord
from adaptflow.progress import image_progress, images_in
from adaptflow.signals import StopRequest
from adaptflow.training.checkpoint import (
    Checkpointer,
    LoopProgress,
    Preempted,
    epoch_rng_state,
    loop_state,
    replay_epoch_start,
    rng_state,
    set_rng_state,
)
from adaptflow.training.distributed import (
    all_reduce_sum,
    any_rank,
    average_gradients,
    check_same_everywhere,
    current_world,
    from_main,
    gather_objects,
    wrap_model,
)
from adaptflow.training.memory import run_within_memory
from adaptflow.training.runtime import peak_memory_mb
from adaptflow.training.step import (
    Diverged,
    evaluate_loader,
    evaluate_sums,
    on_device,
    skips_on_device,
    train_step,
)

log = logging.getLogger(__name__)


@dataclass
class LoopResult:
    history: list[EpochRecord]
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float
    train_images: int
    train_seconds: float
    resumed_from: tuple[int, int] | None = None  # (epoch, step) the run resumed at
    diverged: str | None = None  # where a non-finite loss or gradient stopped training

    @property
    def best(self) -> EpochRecord:
        return self.history[self.best_epoch - 1]

    def best_metrics(self) -> dict[str, float]:
        """Metrics of the kept (best) epoch; the train-val gap is the overfitting measure."""
        b = self.best
        return {
            "train_accuracy": b.train_accuracy,
            "val_accuracy": b.val_accuracy,
            "val_loss": b.val_loss,
            "train_val_gap": b.train_accuracy - b.val_accuracy,
        }

    @property
    def images_per_second(self) -> float | None:
        return self.train_images / self.train_seconds if self.train_seconds else None

    def cost(
        self, started: float, device: torch.device, params: tuple[int, int], backbone_forward_images: int
    ) -> CostFigures:
        """The stage's cost: wall time since ``started`` (perf_counter), (trainable, total) parameters,
        throughput, memory, and how many images went through the backbone."""
        return CostFigures(
            wall_seconds=time.perf_counter() - started,
            trainable_params=params[0],
            total_params=params[1],
            train_images_per_second=self.images_per_second,
            peak_memory_mb=peak_memory_mb(device),
            epochs_run=len(self.history),
            backbone_forward_images=backbone_forward_images,
            device=str(device),
        )


def _until_loader_stops(batches: Iterator[Any], stop: StopRequest | None) -> Iterator[Any]:
    """The epoch's batches; when SIGTERM reached the loader's worker processes too, they just end."""
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except RuntimeError:  # "DataLoader worker (pid N) is killed by signal: Terminated"
            if stop is not None and stop:
                return
            raise
        yield item


def _preempted(label: str, progress: LoopProgress, checkpointer: Checkpointer | None) -> Preempted:
    saved = f"; checkpoint {checkpointer.path}" if checkpointer is not None else ""
    return Preempted(
        f"{label} stopped by SIGTERM at epoch {progress.epoch}, step {progress.step}{saved}",
        hint="run the same command again: it resumes from the checkpoint",
    )


def _load_on_every_rank(checkpointer: Checkpointer, local_rank: int) -> dict[str, Any] | None:
    """Rank 0's checkpoint on every rank. Each node's local rank 0 reads (or fetches from the mirror)
    first, so the other ranks on that node find the file whole instead of fetching it alongside."""
    if not current_world().distributed:
        return checkpointer.load()
    import torch.distributed as dist

    state = checkpointer.load() if local_rank == 0 else None
    dist.barrier()
    return state if local_rank == 0 else checkpointer.load()


def _validate(
    net: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: bool,
    channels_last: bool,
    transform: nn.Module | None,
) -> tuple[float, float]:
    """(mean loss, accuracy) over every rank's images: sums added up, so a shard or the whole split
    per rank gives the same figures on every rank (the unwrapped model: no collective per batch)."""
    if not current_world().distributed:
        return evaluate_loader(net, loader, device, amp, channels_last, transform)
    loss_sum, correct, seen = evaluate_sums(net, loader, device, amp, channels_last, transform)
    totals = all_reduce_sum(
        torch.stack(
            [loss_sum, correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)]
        )
    )
    return float(totals[0]) / max(float(totals[2]), 1.0), float(totals[1]) / max(float(totals[2]), 1.0)


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    patience: int,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    train_mode: Callable[[nn.Module], None] | None = None,
    label: str = "train",
    min_epochs: int = 0,
    checkpointer: Checkpointer | None = None,
    stop: StopRequest | None = None,
    train_transform: nn.Module | None = None,
    val_transform: nn.Module | None = None,
    compile_model: bool = False,
    accumulation_steps: int = 1,
) -> LoopResult:
    """Trains up to ``epochs``; early stopping (``patience``) never ends it before ``min_epochs``.

    With a ``checkpointer`` the loop resumes from its checkpoint when there is one, and writes one
    at epoch ends and every ``checkpointer.every_steps``. When ``stop`` is set (SIGTERM) it writes
    one after the current step and raises :class:`Preempted`.

    ``train_transform``/``val_transform`` turn the loaders' uint8 batches into model input on
    ``device`` (training/batches.py). ``compile_model`` runs the forward and backward passes through
    ``torch.compile``. ``accumulation_steps`` splits each batch into that many passes whose gradients
    add up to the batch's: the memory of a smaller batch, the optimisation of the whole one.

    Under torchrun (a process group is joined: training/distributed.py) the model trains wrapped in
    DDP, gradients are averaged over the ranks after each step's passes, the train and validation
    sums are added up over the ranks, a stop request on any rank stops all, and only rank 0 writes
    the checkpoint; every rank resumes from it. ``train_loader`` then yields this rank's share (its
    sampler's ``set_epoch`` is called each epoch); ``val_loader`` may be a shard or the whole split.
    """
    # same parameters; the state (checkpoints, best weights) stays on ``model``
    net: nn.Module = torch.compile(model) if compile_model else model  # type: ignore[assignment]
    world = current_world()
    train_net, reduce_gradients, local_passes = net, None, contextlib.nullcontext
    if world.distributed:
        train_net = wrap_model(net, device)
        reduce_gradients, local_passes = average_gradients, train_net.no_sync  # type: ignore[assignment]
    criterion = nn.CrossEntropyLoss()
    history: list[EpochRecord] = []
    best_state = copy.deepcopy(model.state_dict())
    progress = LoopProgress()
    resumed = _load_on_every_rank(checkpointer, world.local_rank) if checkpointer is not None else None
    check_same_everywhere(
        [resumed["epoch"], resumed["step"]] if resumed is not None else [0, -1], "the checkpoint to resume"
    )
    epoch_rng: dict[str, Any] = {}
    resumed_rng: dict[str, Any] = {}
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        if scheduler is not None and resumed["scheduler"] is not None:
            scheduler.load_state_dict(resumed["scheduler"])
        best_state = resumed["best_state"]
        history = [EpochRecord.model_validate(r) for r in resumed["history"]]
        progress = LoopProgress(**resumed["progress"])
        epoch_rng, resumed_rng = resumed["epoch_rng"], resumed["rng"]
        ranks = resumed.get("ranks")
        if ranks is not None and len(ranks) == world.world_size:  # each rank's own RNG streams
            epoch_rng, resumed_rng = ranks[world.rank]["epoch_rng"], ranks[world.rank]["rng"]
        elif world.distributed:
            log.warning("%s: checkpoint of another number of processes; rank 0's RNG on every rank", label)
        log.info("%s: resuming at epoch %d, step %d", label, progress.epoch, progress.step)
    resumed_from = (progress.epoch, progress.step) if resumed is not None else None

    def save_checkpoint() -> None:  # called on every rank at the same step: drain and gather are collective
        assert checkpointer is not None
        drain()
        ranks = gather_objects({"epoch_rng": epoch_rng, "rng": rng_state()}) if world.distributed else None
        if world.is_main:
            state = loop_state(progress, model, optimizer, scheduler, best_state, history, epoch_rng)
            checkpointer.save({**state, "ranks": ranks} if ranks else state)

    diverged: str | None = None
    # images per pass: from accumulation_steps, then halved after each out-of-memory error
    micro_batch: int | None = None
    if accumulation_steps > 1:
        micro_batch = (
            max(1, -(-train_loader.batch_size // accumulation_steps)) if train_loader.batch_size else None
        )
    # loss and correct counts stay on the device until a checkpoint or the epoch's end reads them
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    skipped = torch.zeros((), dtype=torch.long, device=device)  # non-finite steps skipped on the device
    seen = torch.zeros((), dtype=torch.float64, device=device)  # images since the last drain, this rank

    def drain() -> None:  # the sums of every rank (collective under torchrun)
        totals = all_reduce_sum(torch.stack([loss_sum, correct.double(), seen]))
        progress.loss_sum += float(totals[0])
        progress.correct += int(totals[1])
        progress.seen += int(totals[2])
        for tensor in (loss_sum, correct, seen):
            tensor.zero_()

    while progress.epoch <= epochs:
        epoch = progress.epoch
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        model.train()
        if train_mode is not None:
            train_mode(model)  # e.g. keep BatchNorm statistics frozen
        set_epoch = getattr(getattr(train_loader, "sampler", None), "set_epoch", None)
        if set_epoch is not None:  # DistributedSampler: the epoch's order from the seed and the epoch
            set_epoch(epoch)
        if resumed is not None and epoch_rng:
            batches = replay_epoch_start(train_loader, epoch_rng, progress.step)
            set_rng_state(resumed_rng)  # the draws after the checkpoint's step, as the first run made them
            resumed = None
        else:
            if checkpointer is not None:  # only a checkpoint needs the epoch's starting RNG states
                epoch_rng = epoch_rng_state(train_loader)
            batches = iter(train_loader)
        start = time.perf_counter()
        with image_progress(f"{label} epoch {epoch}/{epochs}", images_in(train_loader)) as bar:
            for x, y in _until_loader_stops(batches, stop):
                y = y.to(device, non_blocking=True)
                x = on_device(x, device, train_transform, channels_last=False)
                try:
                    with local_passes():  # no collective until the passes are done: see distributed.py
                        (loss, logits), micro_batch = run_within_memory(
                            functools.partial(
                                train_step,
                                train_net,
                                x,
                                y,
                                optimizer,
                                criterion,
                                device,
                                amp,
                                channels_last,
                                skipped=skipped,
                                reduce_gradients=reduce_gradients,
                            ),
                            micro_batch,
                            len(y),
                            label,
                            device,
                        )
                except Diverged as error:  # the gradients were averaged first: every rank raises it
                    diverged = f"{error} at epoch {epoch}, step {progress.step + 1}"
                    break
                loss_sum += loss * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                bar.advance(len(y))
                progress.step += 1
                progress.global_step += 1
                # read once: SIGTERM may land between two reads; a stop on any rank stops every rank
                stopping = any_rank(stop is not None and bool(stop))
                if checkpointer is not None and (
                    stopping or checkpointer.due(progress.global_step, epoch_end=False)
                ):
                    progress.train_seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    save_checkpoint()
                if stopping:
                    raise _preempted(label, progress, checkpointer)
        if any_rank(stop is not None and bool(stop)):  # the loader's workers got SIGTERM first
            if checkpointer is not None:
                save_checkpoint()
            raise _preempted(label, progress, checkpointer)
        drain()
        if diverged is None and skips_on_device(optimizer, device) and int(skipped):
            diverged = f"non-finite loss or gradient in {int(skipped)} step(s) of epoch {epoch} (not taken)"
        if diverged is None:
            val_loss, val_acc = _validate(net, val_loader, device, amp, channels_last, val_transform)
            if not math.isfinite(val_loss):  # finite steps can still blow the weights up
                diverged = f"validation loss {val_loss} after epoch {epoch}"
        if diverged is not None:
            log.warning("%s diverged: %s; keeping the best weights before it", label, diverged)
            break
        if scheduler is not None:
            scheduler.step()
        elapsed = time.perf_counter() - start
        progress.train_seconds += elapsed
        progress.images += progress.seen
        record = EpochRecord(
            epoch=epoch,
            train_loss=progress.loss_sum / max(progress.seen, 1),
            train_accuracy=progress.correct / max(progress.seen, 1),
            val_loss=val_loss,
            val_accuracy=val_acc,
            seconds=elapsed,
        )
        history.append(record)
        log.info(
            "%s epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f (%.1fs)",
            label,
            epoch,
            epochs,
            record.train_loss,
            record.train_accuracy,
            val_loss,
            val_acc,
            elapsed,
        )
        progress.epoch, progress.step = epoch + 1, 0
        progress.loss_sum, progress.correct, progress.seen = 0.0, 0, 0
        early_stop = False
        if (val_acc, -val_loss) > (progress.best_accuracy, -progress.best_loss):
            progress.best_accuracy, progress.best_loss = val_acc, val_loss
            progress.best_epoch, progress.stale = epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            progress.stale += 1
            early_stop = progress.stale >= patience and epoch >= min_epochs
        if early_stop:
            log.info("%s: early stop at epoch %d (best epoch %d)", label, epoch, progress.best_epoch)
            break
        # rank 0 alone writes, so its clock decides whether the epoch-end write is due
        if (
            checkpointer is not None
            and epoch < epochs
            and from_main(checkpointer.due(progress.global_step, True))
        ):
            # the next epoch starts from the generator and RNGs as they are now
            epoch_rng = epoch_rng_state(train_loader)
            save_checkpoint()
    model.load_state_dict(best_state)
    return LoopResult(
        history,
        progress.best_epoch,
        progress.best_accuracy,
        progress.best_loss,
        progress.images,
        progress.train_seconds,
        resumed_from=resumed_from,
        diverged=diverged,
    )
