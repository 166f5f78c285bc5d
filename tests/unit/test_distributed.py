"""The pure parts of distributed training: batch division, the rank-0 guard, sampler seeding, shards."""

from __future__ import annotations

import pytest

from adaptflow.errors import ConfigError
from adaptflow.training.distributed import (
    World,
    current_world,
    eval_shard,
    is_main_process,
    per_rank_batch,
    torchrun_world,
    train_sampler,
)


def test_global_batch_is_split_evenly_or_refused_with_a_hint() -> None:
    assert per_rank_batch(64, 1) == 64
    assert per_rank_batch(64, 4) == 16
    with pytest.raises(ConfigError, match="does not divide") as caught:
        per_rank_batch(64, 3)
    assert caught.value.hint and "cluster.finetune.gpus" in caught.value.hint


def test_world_from_torchrun_environment_and_rank_zero_guard() -> None:
    world = torchrun_world({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (world.rank, world.local_rank, world.world_size, world.local_world_size) == (3, 1, 4, 2)
    assert world.distributed and not world.is_main
    assert torchrun_world({}) == World() and not World().distributed and World().is_main
    # no process group in this process: a single process, which is the main one
    assert current_world() == World() and is_main_process()


def test_ranks_together_take_the_single_process_batches() -> None:
    """Rank r takes every world-th index of one permutation drawn from (seed, epoch), so the ranks'
    i-th batches together are the single process's i-th batch, and the order changes per epoch."""
    size, batch = 40, 8
    orders = {}
    for world_size in (1, 2, 4):
        samplers = [
            train_sampler(size, 7, World(rank, rank, world_size, world_size)) for rank in range(world_size)
        ]
        for sampler in samplers:
            sampler.set_epoch(3)
        shares = [list(s) for s in samplers]
        per_rank = per_rank_batch(batch, world_size)
        steps = [
            sorted(i for share in shares for i in share[step * per_rank : (step + 1) * per_rank])
            for step in range(size // batch)
        ]
        orders[world_size] = steps
    assert orders[1] == orders[2] == orders[4]
    one = train_sampler(size, 7, World())
    one.set_epoch(3)
    again = train_sampler(size, 7, World())
    again.set_epoch(3)
    assert list(one) == list(again)  # seeded: the same order on every rank and after a resume
    again.set_epoch(4)
    assert list(one) != list(again)
    other_seed = train_sampler(size, 8, World())
    other_seed.set_epoch(3)
    assert list(one) != list(other_seed)


def test_validation_shards_cover_every_image_once() -> None:
    shards = [eval_shard(11, World(rank, rank, 3, 3)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))
    assert eval_shard(11, World()) == list(range(11))


def test_collectives_are_no_ops_outside_torchrun() -> None:
    import torch

    from adaptflow.training.distributed import (
        all_reduce_sum,
        any_rank,
        average_gradients,
        from_main,
        gather_objects,
    )

    values = torch.tensor([1.0, 2.0])
    assert torch.equal(all_reduce_sum(values), values)
    assert any_rank(True) and not any_rank(False)
    assert from_main("x") == "x" and gather_objects(5) == [5]
    grad = torch.ones(3)
    average_gradients([grad])
    assert torch.equal(grad, torch.ones(3))
