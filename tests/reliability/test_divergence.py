"""Divergence: a non-finite loss stops fine-tuning before the step, and the baseline wins instead."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptflow.errors import WeightsError
from adaptflow.models.weights import read_weights_file
from adaptflow.training.loop import fit


def _loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    return DataLoader(data, batch_size=8, shuffle=True, generator=g), DataLoader(data, batch_size=32)


def test_a_huge_learning_rate_stops_before_a_non_finite_step_and_keeps_finite_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU(), nn.Linear(16, 3))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = _loaders()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e30)  # the second step's loss overflows
    result = fit(model, train, val, optimizer, epochs=3, patience=3, device=torch.device("cpu"))
    assert result.diverged is not None and "epoch 1" in result.diverged
    assert result.history == []  # it never finished an epoch: nothing NaN was recorded
    for name, tensor in model.state_dict().items():  # the weights before it diverged: the initial ones
        assert torch.equal(tensor, initial[name]), name


def test_a_well_behaved_run_does_not_report_divergence() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    train, val = _loaders()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    result = fit(model, train, val, optimizer, epochs=2, patience=2, device=torch.device("cpu"))
    assert result.diverged is None and len(result.history) == 2


def test_nan_in_a_batchnorm_buffer_is_an_error_naming_the_tensor(tmp_path: Path) -> None:
    state = {"bn1.weight": torch.ones(4), "bn1.running_var": torch.tensor([1.0, float("nan"), 1.0, 1.0])}
    path = tmp_path / "backbone.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"bn1\.running_var holds NaN"):
        read_weights_file(path)
    torch.save({"fc.bias": torch.tensor([float("inf")])}, tmp_path / "backbone.pth")
    with pytest.raises(WeightsError, match=r"fc\.bias"):
        read_weights_file(tmp_path / "backbone.pth")


# slow (make test-all): a whole run; the divergence guard's unit tests above run in CI
@pytest.mark.slow
@pytest.mark.integration
def test_a_diverging_fine_tune_ships_the_baseline_and_the_run_succeeds(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    overrides = [
        *tiny_assets.overrides(tmp_path / "state"),
        "baseline.advisor.force=true",
        "finetune.lr=1e10",
    ]
    command = [sys.executable, "-m", "adaptflow.cli", "run", "--data", str(tiny_assets.target), "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ADAPTFLOW_"))}
    result = subprocess.run(
        [*command, *[a for o in overrides for a in ("--set", o)]],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["winner"] == "baseline"
    assert "finetune-full diverged" in summary["winner_reason"]
    assert summary["registered_version"] is not None
    finetune = summary["finetune"]["metrics"]
    assert all(math.isfinite(v) for v in finetune["accuracy_ci95"])  # no NaN reached a contract
