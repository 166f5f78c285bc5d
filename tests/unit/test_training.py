from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptflow.config import AdvisorConfig, FinetuneConfig, load_settings
from adaptflow.contracts import BaselineResult, Candidate
from adaptflow.data.ingest import ingest
from adaptflow.training.advisor import advise
from adaptflow.training.baseline import run_baseline
from adaptflow.training.finetune import FinetuneInputs, run_finetune


@pytest.fixture(scope="module")
def baseline_run(tiny_baseline):  # type: ignore[no-untyped-def]
    b = tiny_baseline
    return b.settings, b.snapshot, b.inputs, b.result, b.work


def test_baseline_computes_each_backbone_feature_exactly_once(baseline_run) -> None:  # type: ignore[no-untyped-def]
    _settings, snapshot, inputs, result, work = baseline_run
    n = snapshot.counts["train"] + snapshot.counts["val"]
    assert result.candidate.cost.backbone_forward_images == n  # 1 forward pass per image
    again = run_baseline(inputs, work / "baseline-again")
    assert again.candidate.cost.backbone_forward_images == 0  # all from the cache
    assert again.candidate.metrics["val_accuracy"] == pytest.approx(result.candidate.metrics["val_accuracy"])


def test_feature_cache_key_includes_preprocessing(baseline_run) -> None:  # type: ignore[no-untyped-def]
    _settings, _snapshot, inputs, _result, work = baseline_run
    bigger = inputs.weights.preprocessing.model_copy(update={"input_size": 40, "resize_size": 40})
    from dataclasses import replace

    changed = replace(inputs, weights=replace(inputs.weights, preprocessing=bigger))
    assert run_baseline(changed, work / "b40").candidate.cost.backbone_forward_images > 0


def test_baseline_candidate_and_decision(baseline_run) -> None:  # type: ignore[no-untyped-def]
    _settings, snapshot, _inputs, result, work = baseline_run
    loaded = BaselineResult.load(work / "baseline")
    assert loaded == result
    c = result.candidate
    assert c.name == "baseline" and c.cost.trainable_params == 512 * 5 + 5
    assert c.cost.total_params > 11_000_000
    assert (work / "baseline" / "candidate" / Candidate.WEIGHTS).exists()
    signals = result.decision.signals
    assert signals["min_train_images_per_class"] == min(snapshot.class_counts["train"].values())
    assert signals["domain_shift"] is not None and float(signals["domain_shift"]) > 0
    assert float(signals["estimated_finetune_seconds"]) > 0
    assert result.decision.reason


def test_baseline_saves_the_backbone_its_head_was_trained_on(baseline_run, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    """The throughput probe runs a train-mode step; BatchNorm running statistics must not move."""
    from adaptflow.models.weights import read_weights_file
    from adaptflow.training.candidates import load_candidate

    _settings, _snapshot, _inputs, _result, work = baseline_run
    source, _meta = read_weights_file(tiny_assets.weights)
    _candidate, model = load_candidate(work / "baseline" / "candidate")
    saved = model.backbone.state_dict()
    stats = [k for k in saved if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 40  # resnet18: 20 BatchNorm layers
    assert all(torch.equal(saved[k], source[k]) for k in stats)


@pytest.mark.parametrize("strategy", ["partial", "full"])
def test_finetune_starts_from_baseline_head_and_keeps_best_epoch(baseline_run, strategy: str) -> None:  # type: ignore[no-untyped-def]
    settings, snapshot, _inputs, result, work = baseline_run
    cfg = settings.finetune.model_copy(update={"strategy": strategy, "epochs": 2, "unfreeze_blocks": 1})
    out = work / f"training-ft-{strategy}"
    candidate = run_finetune(FinetuneInputs(snapshot, result, work / "baseline" / "candidate", cfg), out)
    assert candidate.name == f"finetune-{strategy}"
    assert Candidate.load(out) == candidate
    best = max(candidate.history, key=lambda h: (h.val_accuracy, -h.val_loss))
    assert candidate.metrics["val_accuracy"] == pytest.approx(best.val_accuracy)
    head = 512 * 5 + 5
    if strategy == "partial":
        assert head < candidate.cost.trainable_params < candidate.cost.total_params
    else:
        assert candidate.cost.trainable_params == candidate.cost.total_params


def _signals(acc: float, per_class: int = 100, estimate: float = 10.0) -> dict:
    return {
        "baseline_val_accuracy": acc,
        "min_train_images_per_class": per_class,
        "estimated_finetune_seconds": estimate,
        "domain_shift": 0.5,
    }


@pytest.mark.parametrize(
    ("signals", "cfg", "expected", "phrase"),
    [
        (_signals(0.99), AdvisorConfig(), False, "transfer learning is enough"),
        (_signals(0.80, per_class=5), AdvisorConfig(), False, "too little data"),
        (_signals(0.80, estimate=5000), AdvisorConfig(), False, "over budget"),
        (_signals(0.80), AdvisorConfig(), True, "fine-tune (full)"),
        (_signals(0.99), AdvisorConfig(force=True), True, "forced"),
    ],
)
def test_advisor_branches(signals: dict, cfg: AdvisorConfig, expected: bool, phrase: str) -> None:
    decision = advise(signals, cfg, FinetuneConfig())
    assert decision.should_finetune is expected
    assert phrase in decision.reason
    assert decision.signals == signals


def test_unknown_device_is_reported() -> None:
    import torch

    from adaptflow.errors import ConfigError
    from adaptflow.training.runtime import pick_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        pick_device("cuda")


def test_changed_file_after_ingest_is_detected(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from adaptflow.data.images import ImageStore
    from adaptflow.errors import DataError

    data = tmp_path / "d"
    shutil.copytree(tiny_assets.target, data)
    snapshot = ingest(str(data), load_settings().ingest)
    entry = snapshot.entries[0]
    other = snapshot.entries[-1]
    Path(entry.uri).write_bytes(Path(other.uri).read_bytes())
    with pytest.raises(DataError, match="changed after ingest"):
        ImageStore().read(entry)
