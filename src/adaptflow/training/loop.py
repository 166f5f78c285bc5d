"""The supervised loop used by pretraining and fine-tuning: epochs, validation, early stopping.

The best weights (by validation accuracy, ties broken by lower validation loss) are kept and
restored at the end, so a late overfitting epoch never becomes the candidate.
"""

from __future__ import annotations

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
    set_rng_state,
)
from adaptflow.training.memory import run_within_memory
from adaptflow.training.runtime import peak_memory_mb
from adaptflow.training.step import Diverged, evaluate_loader, on_device, skips_on_device, train_step

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
    """
    # same parameters; the state (checkpoints, best weights) stays on ``model``
    net: nn.Module = torch.compile(model) if compile_model else model  # type: ignore[assignment]
    criterion = nn.CrossEntropyLoss()
    history: list[EpochRecord] = []
    best_state = copy.deepcopy(model.state_dict())
    progress = LoopProgress()
    resumed = checkpointer.load() if checkpointer is not None else None
    epoch_rng: dict[str, Any] = {}
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        if scheduler is not None and resumed["scheduler"] is not None:
            scheduler.load_state_dict(resumed["scheduler"])
        best_state = resumed["best_state"]
        history = [EpochRecord.model_validate(r) for r in resumed["history"]]
        progress = LoopProgress(**resumed["progress"])
        epoch_rng = resumed["epoch_rng"]
        log.info("%s: resuming at epoch %d, step %d", label, progress.epoch, progress.step)
    resumed_from = (progress.epoch, progress.step) if resumed is not None else None

    def save_checkpoint() -> None:
        assert checkpointer is not None
        drain()
        checkpointer.save(loop_state(progress, model, optimizer, scheduler, best_state, history, epoch_rng))

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

    def drain() -> None:
        progress.loss_sum += float(loss_sum)
        progress.correct += int(correct)
        loss_sum.zero_()
        correct.zero_()

    while progress.epoch <= epochs:
        epoch = progress.epoch
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        model.train()
        if train_mode is not None:
            train_mode(model)  # e.g. keep BatchNorm statistics frozen
        if resumed is not None and epoch_rng:
            batches = replay_epoch_start(train_loader, epoch_rng, progress.step)
            set_rng_state(resumed["rng"])  # the draws after the checkpoint's step, as the first run made them
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
                    (loss, logits), micro_batch = run_within_memory(
                        functools.partial(
                            train_step,
                            net,
                            x,
                            y,
                            optimizer,
                            criterion,
                            device,
                            amp,
                            channels_last,
                            skipped=skipped,
                        ),
                        micro_batch,
                        len(y),
                        label,
                        device,
                    )
                except Diverged as error:
                    diverged = f"{error} at epoch {epoch}, step {progress.step + 1}"
                    break
                loss_sum += loss * len(y)
                correct += (logits.argmax(1) == y).sum()
                progress.seen += len(y)
                bar.advance(len(y))
                progress.step += 1
                progress.global_step += 1
                stopping = stop is not None and bool(stop)  # read once: SIGTERM may land between two reads
                if checkpointer is not None and (
                    stopping or checkpointer.due(progress.global_step, epoch_end=False)
                ):
                    progress.train_seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    save_checkpoint()
                if stopping:
                    raise _preempted(label, progress, checkpointer)
        if stop is not None and stop:  # the loader's workers got SIGTERM first: save the last whole step
            if checkpointer is not None:
                save_checkpoint()
            raise _preempted(label, progress, checkpointer)
        drain()
        if diverged is None and skips_on_device(optimizer, device) and int(skipped):
            diverged = f"non-finite loss or gradient in {int(skipped)} step(s) of epoch {epoch} (not taken)"
        if diverged is None:
            val_loss, val_acc = evaluate_loader(net, val_loader, device, amp, channels_last, val_transform)
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
        seen = progress.seen
        record = EpochRecord(
            epoch=epoch,
            train_loss=progress.loss_sum / max(seen, 1),
            train_accuracy=progress.correct / max(seen, 1),
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
        if checkpointer is not None and epoch < epochs and checkpointer.due(progress.global_step, True):
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
