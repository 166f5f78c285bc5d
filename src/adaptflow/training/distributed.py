"""Data-parallel training under torchrun: the process group, the rank-0 guard, the collectives the loop
needs, and the in-pod launcher.

Outside torchrun (``WORLD_SIZE`` unset or 1) every helper here is a no-op and no process group exists.
Under torchrun the loop (training/loop.py) wraps the model in ``DistributedDataParallel`` and:

- averages the gradients itself after each step's passes, which run under ``no_sync()``: the
  out-of-memory back-off (training/memory.py) re-runs a step's passes in smaller pieces on one rank
  only, which DDP's in-backward all-reduces cannot survive (the ranks would issue different
  collectives); after the passes no rank can fail halfway through a collective;
- agrees once per step, on a one-element tensor, whether any rank got SIGTERM, so all stop together;
- sums the train and validation counts over the ranks, so every rank takes the same decisions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from adaptflow.errors import AdaptflowError, ConfigError, Interrupted, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: gradients are averaged in flat buckets of about this many bytes (one collective each)
BUCKET_BYTES = 32 * 2**20


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_world(env: Mapping[str, str] | None = None) -> World:
    """The world torchrun describes in the environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ...)."""
    env = os.environ if env is None else env
    size = int(env.get("WORLD_SIZE", "1"))
    return World(
        rank=int(env.get("RANK", "0")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        world_size=size,
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(size))),
    )


def current_world() -> World:
    """The world of the process group in use; a single process when there is none."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    env = torchrun_world()
    return World(dist.get_rank(), env.local_rank, dist.get_world_size(), env.local_world_size)


def is_main_process() -> bool:
    """The rank-0 guard: the one process that logs to MLflow and writes checkpoints and outputs."""
    return current_world().is_main


def rank_device(device: torch.device, world: World) -> torch.device:
    """Under torchrun each process drives its own GPU, ``cuda:LOCAL_RANK``; CPU stays CPU."""
    if device.type != "cuda" or not world.distributed:
        return device
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def training_world(device: torch.device) -> Iterator[tuple[World, torch.device]]:
    """(world, this rank's device). Under torchrun, joins the process group for the block (``nccl`` on
    CUDA, ``gloo`` on CPU) and leaves it at the end; a group already joined (the worker's) is reused
    and left to whoever created it."""
    import torch.distributed as dist

    env = torchrun_world()
    if not env.distributed or dist.is_initialized():
        world = current_world()
        yield world, rank_device(device, world)
        return
    device = rank_device(device, env)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    log.info("rank %d of %d on %s (%s)", env.rank, env.world_size, device, backend)
    try:
        yield current_world(), device
    finally:
        dist.destroy_process_group()


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """Each rank's batch, so that the ranks together take the configured (global) batch per step."""
    if global_batch % world_size:
        raise ConfigError(
            f"batch {global_batch} does not divide among {world_size} training processes",
            hint="use a number of GPUs (cluster.finetune.gpus) that divides the batch, e.g. a power of "
            "two, or set finetune.batch_size to a multiple of it",
        )
    return global_batch // world_size


def train_sampler(dataset_size: int, seed: int, world: World) -> torch.utils.data.DistributedSampler[Any]:
    """This rank's share of each epoch's shuffle. The order is drawn from ``seed`` and the epoch
    (``set_epoch``), so it is the same for any number of ranks: rank r takes every world-th index of
    one permutation, and the ranks' i-th batches together are the single process's i-th batch."""
    from torch.utils.data import DistributedSampler

    indices = range(dataset_size)  # the sampler only needs the length
    return DistributedSampler(
        indices,  # type: ignore[arg-type]
        num_replicas=world.world_size,
        rank=world.rank,
        shuffle=True,
        seed=seed,
    )


def eval_shard(dataset_size: int, world: World) -> list[int]:
    """This rank's validation images: every world-th one, without the padding DistributedSampler adds
    (a repeated image would be counted twice in the summed metrics)."""
    return list(range(world.rank, dataset_size, world.world_size))


# --------------------------------------------------------------------------- collectives


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks (in place where it can be); itself outside torchrun."""
    world = current_world()
    if not world.distributed:
        return values
    import torch.distributed as dist

    on_comm = values.to(_comm_device())
    dist.all_reduce(on_comm)
    return on_comm.to(values.device)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any: one tiny all-reduce (a host sync on CUDA)."""
    if not current_world().distributed:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank (a picklable object), e.g. a decision only rank 0 can take."""
    if not current_world().distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[no-any-return]


def gather_objects(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    world = current_world()
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, value)
    return out


def check_same_everywhere(values: list[int], what: str) -> None:
    """Raises when the ranks hold different ``values`` (e.g. resumed at different steps)."""
    if not current_world().distributed:
        return
    import torch.distributed as dist

    mine = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise StoreError(
            f"the training processes disagree on {what}: from {low.tolist()} to {high.tolist()}",
            hint="every node must read the same checkpoint: set cluster.pipeline_root to an s3:// URI "
            "(checkpoints are mirrored there) or put the checkpoint folder on a shared volume",
        )


def average_gradients(grads: list[torch.Tensor]) -> None:
    """Replaces each gradient by its mean over the ranks, in flat buckets of :data:`BUCKET_BYTES`.

    Every rank holds the same list (same trainable parameters, in the optimizer's order)."""
    world = current_world()
    if not world.distributed or not grads:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    bucket: list[torch.Tensor] = []
    size = 0
    for grad in [*grads, None]:
        if grad is not None:
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
        if bucket and (grad is None or size >= BUCKET_BYTES):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= world.world_size
            for target, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                target.copy_(averaged)
            bucket, size = [], 0


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in ``DistributedDataParallel``: rank 0's weights and buffers are copied to every rank
    now, and its buffers (BatchNorm statistics) before each forward pass. The loop trains under
    ``no_sync()`` and calls :func:`average_gradients`, so which parameters are frozen (partial, LoRA,
    gradual unfreezing, which changes them per epoch) does not matter to the wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=True)


# --------------------------------------------------------------------------- the in-pod launcher


class WorkerFailed(AdaptflowError):
    """A training process launched by :func:`launch_on_this_node` failed; names its rank and error."""


def _failure_message(message: Any) -> str:
    if isinstance(message, dict):  # the error file's {"message": ..., "extraInfo": {...}}
        message = message.get("message", message)
    return str(message).strip()


def launch_on_this_node(nproc: int, worker_argv: list[str], *, run_id: str | None = None) -> None:
    """Runs ``python -m adaptflow.training.finetune_worker`` (``worker_argv`` are its arguments; or a
    ``-m module ...`` or ``script.py ...`` command line of another entry point) in ``nproc`` processes on this node with torch's elastic launcher,
    rendezvous on localhost. A failed worker becomes one error naming its rank and message; a worker
    stopped by SIGTERM (after its checkpoint) becomes :class:`Interrupted`, which a retry resumes."""
    import sys

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from adaptflow.errors import EXIT_PREEMPTED, RETRYABLE_EXITS
    from adaptflow.signals import handlers_restored

    own_entry = worker_argv[:1] == ["-m"] or (bool(worker_argv) and worker_argv[0].endswith(".py"))
    args = worker_argv if own_entry else ["-m", "adaptflow.training.finetune_worker", *worker_argv]
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=run_id or f"adaptflow-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # torchrun --standalone: a free port on this node
        max_restarts=0,  # a retried task resumes from the checkpoint; the agent does not retry
        monitor_interval=0.5,
        start_method="spawn",
    )
    log.info("launching %d training processes on this node", nproc)
    try:
        # the elastic agent installs its own handlers in this process and leaves them there: a later
        # SIGTERM would raise its SignalException instead of reaching this stage's graceful stop
        with handlers_restored("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"):
            elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        message = _failure_message(failure.message) or f"exit code {failure.exitcode}"
        text = f"training process rank {rank} (of {nproc}) failed: {message}"
        if failure.exitcode == EXIT_PREEMPTED:
            raise Interrupted(text, hint="run it again: it resumes from the checkpoint") from None
        raise WorkerFailed(
            text,
            hint="the message above is the failed rank's; the others were stopped with it",
            transient=failure.exitcode in RETRYABLE_EXITS,
        ) from None
    except SignalException as error:  # SIGTERM to this process: the agent stopped the workers too
        raise Interrupted(
            f"distributed training stopped by signal {error.sigval}",
            hint="run it again: it resumes from the checkpoint",
        ) from None
