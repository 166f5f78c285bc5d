from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adaptflow.config import AdvisorConfig, FinetuneConfig, load_settings
from adaptflow.contracts import BaselineResult, Candidate
from adaptflow.data.ingest import ingest
from adaptflow.training.advisor import advise
from adaptflow.training.baseline import run_baseline
from adaptflow.training.features import FeatureCache
from adaptflow.training.finetune import FinetuneInputs, run_finetune
from scoring import saved_candidate_accuracy


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


def _cached_images(root: Path) -> dict[str, set[str]]:
    """Feature-cache namespace folder -> the image hashes cached in it."""
    return {ns.name: FeatureCache(root, ns.name).images() for ns in root.iterdir() if ns.is_dir()}


def test_feature_cache_key_includes_the_weights_hash(baseline_run, tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Same images, same preprocessing, other weights: every feature is recomputed into its own entries."""
    from dataclasses import replace

    from adaptflow.config import BackboneSpec
    from adaptflow.models.weights import read_weights_file, resolve_weights, save_weights_file

    _settings, snapshot, inputs, _result, _work = baseline_run
    images = {e.sha256 for e in snapshot.split("train") + snapshot.split("val")}
    cache = tmp_path / "features"
    shutil.copytree(inputs.feature_cache_dir, cache)  # holds the shared baseline's features (weights A)
    before = _cached_images(cache)
    assert images in before.values()

    # weights B: the same architecture and preprocessing, every convolution negated
    state, meta = read_weights_file(tiny_assets.weights)
    other = {k: -v if v.dim() == 4 else v for k, v in state.items()}
    path = tmp_path / "resnet18-other.safetensors"
    sha = save_weights_file(other, path, meta)
    assert sha != inputs.weights.sha256
    spec = BackboneSpec(name=inputs.spec.name, weights_uri=path.as_uri(), sha256=sha)
    weights = resolve_weights(spec, tmp_path / "weights")
    assert weights.preprocessing == inputs.weights.preprocessing
    changed = replace(inputs, spec=spec, weights=weights, feature_cache_dir=cache)

    first = run_baseline(changed, tmp_path / "b-other").candidate
    assert first.backbone_sha256 == sha
    assert first.cost.backbone_forward_images == len(images)  # nothing served from weights A's entries
    after = _cached_images(cache)
    assert {k: after[k] for k in before} == before  # A's entries untouched
    (added,) = set(after) - set(before)
    assert after[added] == images
    some = sorted(images)[0]
    a_dir = next(ns for ns, cached in before.items() if cached == images)
    a_vec, b_vec = (FeatureCache(cache, ns).lookup([some])[some] for ns in (a_dir, added))
    assert not np.allclose(a_vec, b_vec)  # B's features really are different ones

    again = run_baseline(changed, tmp_path / "b-other-again").candidate
    assert again.cost.backbone_forward_images == 0  # the same weights again: every feature from the cache
    assert again.metrics["val_accuracy"] == pytest.approx(first.metrics["val_accuracy"])
    assert _cached_images(cache) == after


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
    # weights pretrained here carry their source task, so the semantic signal is measured too
    assert 0.2 < float(signals["probe_cv_accuracy"]) <= 1.0  # type: ignore[arg-type]
    assert isinstance(signals["transfer_gap"], float)
    assert f"transfer gap {signals['transfer_gap']:.2f}" in result.decision.reason
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


def test_finetune_saves_the_best_epoch_not_the_last(baseline_run, monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Epoch 1 trains normally; then the learning rate jumps 1000x and wrecks the weights.

    The candidate on disk must be epoch 1's model: the same weights as a run that stopped after
    epoch 1, and scoring exactly epoch 1's validation accuracy, not the last epoch's.
    """
    settings, snapshot, _inputs, result, work = baseline_run
    lambda_lr = torch.optim.lr_scheduler.LambdaLR

    def wrecking(optimizer, T_max, **_):  # type: ignore[no-untyped-def]
        return lambda_lr(optimizer, lambda epoch: 1.0 if epoch == 0 else 1000.0)

    monkeypatch.setattr(torch.optim.lr_scheduler, "CosineAnnealingLR", wrecking)
    cfg = settings.finetune.model_copy(
        update={"strategy": "partial", "epochs": 3, "patience": 3, "augment": False}
    )
    start = work / "baseline" / "candidate"
    candidate = run_finetune(FinetuneInputs(snapshot, result, start, cfg), tmp_path / "ft")
    history = candidate.history
    assert [h.epoch for h in history] == [1, 2, 3]
    best, last = history[0], history[-1]
    # the setup did force an early best: the wrecked epochs are far worse
    assert max(h.val_accuracy for h in history[1:]) < best.val_accuracy - 0.25
    assert candidate.extra["best_epoch"] == "1"
    assert candidate.metrics["val_accuracy"] == pytest.approx(best.val_accuracy)

    saved = saved_candidate_accuracy(tmp_path / "ft", snapshot.split("val"))
    assert saved == pytest.approx(best.val_accuracy)
    assert saved != pytest.approx(last.val_accuracy)

    one = cfg.model_copy(update={"epochs": 1})
    run_finetune(FinetuneInputs(snapshot, result, start, one), tmp_path / "ft-1")
    kept, epoch1 = (load_file(str(tmp_path / d / Candidate.WEIGHTS)) for d in ("ft", "ft-1"))
    assert kept.keys() == epoch1.keys()
    assert all(torch.equal(kept[k], epoch1[k]) for k in kept), "saved weights are not epoch 1's"


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
        (_signals(0.80, per_class=5), AdvisorConfig(min_images_per_class=20), False, "too little data"),
        (_signals(0.80, per_class=5), AdvisorConfig(), True, "fine-tune (full)"),
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


def test_finetune_from_shards_sees_the_same_validation_images(baseline_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``finetune.data_source=shards``: the shards are written once, and fine-tuning trains from them."""
    from adaptflow.data.shards import shard_set_uri

    settings, snapshot, _inputs, result, work = baseline_run
    shards = {"data_source": "shards", "shards_root": str(tmp_path / "root"), "num_workers": 0}
    cfg = settings.finetune.model_copy(
        update={"strategy": "partial", "epochs": 1, "augment": False, **shards}
    )
    cfg = cfg.model_copy(update={"shard_cache_dir": str(tmp_path / "cache")})
    candidate = run_finetune(
        FinetuneInputs(snapshot, result, work / "baseline" / "candidate", cfg), tmp_path / "ft"
    )
    for split in ("train", "val"):
        assert (
            Path(shard_set_uri(str(tmp_path / "root"), snapshot.fingerprint, split)) / "index.json"
        ).exists()
    # validation from shards scores the same images as the decoded path: the saved weights agree with it
    assert candidate.metrics["val_accuracy"] == pytest.approx(
        saved_candidate_accuracy(tmp_path / "ft", snapshot.split("val"))
    )
    assert candidate.cost.epochs_run == 1
