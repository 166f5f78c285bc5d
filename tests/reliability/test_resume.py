"""Preemption-safe training: a run stopped by SIGTERM and resumed ends where an uninterrupted one does."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adaptflow.signals import StopRequest, stop_on_sigterm
from adaptflow.training.checkpoint import Checkpointer, Preempted
from adaptflow.training.loop import fit

EPOCHS = 4


class _Flipped(Dataset[tuple[torch.Tensor, int]]):
    """Random flips drawn from torch's global RNG, as torchvision's transforms draw them."""

    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.x[i]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.y[i])


def _setup() -> tuple[
    nn.Module, DataLoader, DataLoader, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler
]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2), nn.Linear(288, 3)
    )
    data = _Flipped()
    train = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    val = DataLoader(data, batch_size=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    return model, train, val, optimizer, scheduler


def _train(checkpointer: Checkpointer | None = None, stop: StopRequest | None = None) -> nn.Module:
    model, train, val, optimizer, scheduler = _setup()
    fit(
        model,
        train,
        val,
        optimizer,
        epochs=EPOCHS,
        patience=EPOCHS,
        device=torch.device("cpu"),
        scheduler=scheduler,
        checkpointer=checkpointer,
        stop=stop,
    )
    return model


class _StopAfter(StopRequest):
    """True from check ``n + 1``: SIGTERM arrived during step ``n + 1`` (the loop checks once a step)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def __bool__(self) -> bool:
        self.left -= 1
        return self.left < 0


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), name


# 6 steps per epoch: stop after epoch 1 step 3, epoch 2 step 1, the last step of epoch 2, epoch 3 step 6
@pytest.mark.parametrize("steps_before_stop", [2, 6, 11, 17])
def test_interrupted_then_resumed_matches_uninterrupted(tmp_path: Path, steps_before_stop: int) -> None:
    reference = _train()
    ckpt = Checkpointer(tmp_path / "ckpt.pt", identity="run-a")
    with pytest.raises(Preempted, match="resumes"):
        _train(ckpt, stop=_StopAfter(steps_before_stop))
    assert ckpt.path.is_file()
    resumed = _train(Checkpointer(tmp_path / "ckpt.pt", identity="run-a"))
    _assert_same_weights(reference, resumed)
    # and a run from scratch differs, so the comparison above can fail
    model, *_ = _setup()
    assert any(
        not torch.equal(x, y)
        for x, y in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )


def test_every_steps_checkpoint_survives_a_kill_and_a_foreign_checkpoint_is_ignored(tmp_path: Path) -> None:
    reference = _train()
    # every 5 steps, and no epoch-end writes (at most one an hour here)
    ckpt = Checkpointer(tmp_path / "ckpt.pt", identity="run-a", every_steps=5, min_seconds=3600)

    class Killed(Exception):
        pass

    class KillAt(StopRequest):  # a SIGKILL: no chance to checkpoint after step 8
        def __init__(self) -> None:
            super().__init__()
            self.checks = 0

        def __bool__(self) -> bool:
            self.checks += 1
            if self.checks == 8:
                raise Killed
            return False

    with pytest.raises(Killed):
        _train(ckpt, stop=KillAt())
    state = torch.load(ckpt.path, weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 5)  # the last every-5-steps write
    assert not list(tmp_path.glob("*.tmp-*"))  # written by rename: no leftovers
    _assert_same_weights(reference, _train(Checkpointer(ckpt.path, identity="run-a")))
    assert Checkpointer(ckpt.path, identity="run-b").load() is None  # another run's: start over


def test_sigterm_sets_the_stop_request_instead_of_killing() -> None:
    with stop_on_sigterm() as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


@pytest.mark.integration
def test_a_retried_pod_on_a_fresh_disk_resumes_from_the_s3_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adaptflow.storage import s3_client
    from adaptflow.training.checkpoint import CHECKPOINT_ROOT_ENV, stage_checkpointer
    from services import moto_s3

    monkeypatch.delenv(CHECKPOINT_ROOT_ENV, raising=False)  # as in a pod: no local root
    reference = _train()
    with moto_s3():
        s3_client().create_bucket(Bucket="root")

        def on_a_fresh_disk(disk: Path) -> Checkpointer:
            return stage_checkpointer(
                "finetune", "run-a", pipeline_root="s3://root/pipeline", scratch_dir=disk, min_seconds=0
            )

        first = on_a_fresh_disk(tmp_path / "pod-1")
        assert first.mirror is not None and first.mirror.startswith(
            "s3://root/pipeline/checkpoints/finetune-"
        )
        with pytest.raises(Preempted):
            _train(first, stop=_StopAfter(8))
        keys = [o["Key"] for o in s3_client().list_objects_v2(Bucket="root").get("Contents", [])]
        assert keys == [first.mirror.removeprefix("s3://root/")]
        retried = on_a_fresh_disk(tmp_path / "pod-2")  # nothing on this disk: fetched from S3
        _assert_same_weights(reference, _train(retried))
        retried.remove()
        assert s3_client().list_objects_v2(Bucket="root").get("KeyCount") == 0
