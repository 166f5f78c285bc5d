"""The CUDA path of fine-tuning: bf16 autocast and channels_last. Runs only where a GPU is present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)"),
]


def test_finetune_on_cuda_with_amp_and_channels_last(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from adaptflow.config import load_settings
    from adaptflow.data.ingest import ingest
    from adaptflow.models.weights import resolve_weights
    from adaptflow.training.baseline import BaselineInputs, run_baseline
    from adaptflow.training.candidates import load_candidate
    from adaptflow.training.finetune import FinetuneInputs, run_finetune
    from scoring import saved_candidate_accuracy

    settings = load_settings(
        overrides=[
            *tiny_assets.overrides(tmp_path),
            "finetune.device=cuda",
            "finetune.amp=true",
            "finetune.channels_last=true",
            "finetune.strategy=full",
        ]
    )
    snapshot = ingest(str(tiny_assets.target), settings.ingest)
    weights = resolve_weights(settings.backbone, tmp_path / "w")
    baseline = run_baseline(
        BaselineInputs(
            snapshot, settings.backbone, weights, settings.baseline, settings.finetune, tmp_path / "f"
        ),
        tmp_path / "b",
    )
    assert baseline.candidate.cost.device.startswith("cuda")
    candidate = run_finetune(
        FinetuneInputs(snapshot, baseline, tmp_path / "b" / "candidate", settings.finetune), tmp_path / "ft"
    )
    assert candidate.cost.device.startswith("cuda")
    assert candidate.cost.peak_memory_mb and candidate.cost.peak_memory_mb > 0
    # weights are saved contiguous and on the CPU, so the CPU export path loads them unchanged
    _, model = load_candidate(tmp_path / "ft")
    assert all(p.device.type == "cpu" for p in model.parameters())
    best = max(candidate.history, key=lambda h: (h.val_accuracy, -h.val_loss))
    assert candidate.metrics["val_accuracy"] == pytest.approx(best.val_accuracy)
    # the reported accuracy (bf16 on CUDA) is the saved model's, scored again here in fp32 on the CPU;
    # one image of slack for a near-tie that bf16 rounding decides the other way
    val = snapshot.split("val")
    on_cpu = saved_candidate_accuracy(tmp_path / "ft", val)
    assert abs(candidate.metrics["val_accuracy"] - on_cpu) <= 1 / len(val) + 1e-9, (on_cpu, candidate.metrics)
