"""Every fine-tuning strategy trains, produces a candidate, and trains exactly the parameters it says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptflow.config import FinetuneConfig
from adaptflow.contracts import Candidate
from adaptflow.models.factory import Classifier, build_model, count_parameters
from adaptflow.training.candidates import load_candidate
from adaptflow.training.finetune import FinetuneInputs, run_finetune
from adaptflow.training.strategies import (
    freeze_batchnorm,
    freeze_frozen_batchnorm,
    merge_lora,
    plan_strategy,
    schedule_epochs,
)
from scoring import saved_candidate_accuracy

HEAD = 512 * 5 + 5  # resnet18 features -> 5 target digits


@pytest.fixture(scope="module")
def base(tiny_baseline):  # type: ignore[no-untyped-def]
    b = tiny_baseline
    return b.settings, b.snapshot, b.result, b.work


def _finetune(base, out: str, **update):  # type: ignore[no-untyped-def]
    settings, snapshot, result, work = base
    cfg = settings.finetune.model_copy(update={"epochs": 1, "patience": 1, "augment": False, **update})
    candidate = run_finetune(
        FinetuneInputs(snapshot, result, work / "baseline" / "candidate", cfg), work / out
    )
    return candidate, work / out


def _block_params(model: Classifier, n: int) -> int:
    return sum(p.numel() for b in model.blocks()[len(model.blocks()) - n :] for p in b.parameters())


def _bn_stats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}


@pytest.mark.parametrize("strategy", ["linear_probe", "partial", "full", "gradual", "lora"])
def test_every_strategy_trains_and_produces_a_loadable_candidate(base, strategy: str) -> None:  # type: ignore[no-untyped-def]
    candidate, folder = _finetune(base, f"ft-{strategy}", strategy=strategy, unfreeze_blocks=2)
    assert candidate.name == f"finetune-{strategy}" and candidate.strategy == strategy
    assert Candidate.load(folder) == candidate
    _loaded, model = load_candidate(folder)  # strict load into a fresh, plain Classifier
    assert isinstance(model, Classifier)
    assert len(candidate.history) == 1
    # the reported accuracy is the saved model's, scored here from the image files
    val = base[1].split("val")
    assert candidate.metrics["val_accuracy"] == pytest.approx(saved_candidate_accuracy(folder, val))
    assert candidate.metrics["val_accuracy"] == pytest.approx(candidate.history[0].val_accuracy)
    assert "train_val_gap" in candidate.metrics
    fresh = build_model("resnet18", 5)
    _, total = count_parameters(fresh)
    trainable = candidate.cost.trainable_params
    assert candidate.cost.total_params == total  # LoRA adapters merged away before export
    if strategy in ("linear_probe", "gradual"):  # gradual's first epoch is head-only
        assert trainable == HEAD
    elif strategy == "partial":
        assert trainable == HEAD + _block_params(fresh, 2)
        assert HEAD < trainable < total
    elif strategy == "full":
        assert trainable == total
    else:
        assert HEAD < trainable < 0.05 * total


def test_linear_probe_never_changes_the_backbone_even_without_freeze_bn(base) -> None:  # type: ignore[no-untyped-def]
    _settings, _snapshot, _result, work = base
    before = load_file(str(work / "baseline" / "candidate" / Candidate.WEIGHTS))
    _, folder = _finetune(base, "lp-no-freeze", strategy="linear_probe", freeze_bn=False, lr=0.01)
    after = load_file(str(folder / Candidate.WEIGHTS))
    for key, value in before.items():
        if key.startswith("backbone."):
            assert torch.equal(value, after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("head."))


@pytest.mark.parametrize(("freeze_bn", "changed"), [(True, False), (False, True)])
def test_freeze_bn_keeps_running_statistics(base, freeze_bn: bool, changed: bool) -> None:  # type: ignore[no-untyped-def]
    _settings, _snapshot, _result, work = base
    before = _bn_stats(load_file(str(work / "baseline" / "candidate" / Candidate.WEIGHTS)))
    _, folder = _finetune(base, f"full-bn-{freeze_bn}", strategy="full", freeze_bn=freeze_bn)
    after = _bn_stats(load_file(str(folder / Candidate.WEIGHTS)))
    assert before.keys() == after.keys() and before
    differs = [k for k in before if not torch.equal(before[k], after[k])]
    assert bool(differs) is changed


def test_freeze_helpers_put_the_right_batchnorm_layers_in_eval_mode() -> None:
    model = build_model("resnet18", 3)
    plan_strategy(model, FinetuneConfig(strategy="partial", unfreeze_blocks=1))
    model.train()
    freeze_frozen_batchnorm(model)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert all(m.training == n.startswith("backbone.layer4") for n, m in bns.items())
    freeze_batchnorm(model)
    assert not any(m.training for m in bns.values())


def test_gradual_unfreezes_one_block_per_period_top_down() -> None:
    model = build_model("resnet18", 5)
    cfg = FinetuneConfig(strategy="gradual", gradual_epochs_per_block=2)
    plan = plan_strategy(model, cfg)
    assert plan.on_epoch_start is not None
    blocks = model.blocks()
    seen = []
    for epoch in range(1, 13):
        plan.on_epoch_start(epoch)
        trainable = count_parameters(model)[0]
        n = min(len(blocks), (epoch - 1) // 2)
        assert trainable == HEAD + _block_params(model, n)
        seen.append(trainable)
    assert seen == sorted(seen) and seen[0] == HEAD and seen[-1] == count_parameters(model)[1]
    # all blocks are in the optimizer from the start, so unfreezing needs no new optimizer
    in_groups = {id(p) for g in plan.param_groups for p in g["params"]}
    assert all(id(p) in in_groups for p in model.parameters())
    assert schedule_epochs(model, cfg) == len(blocks) * 2 + 1


def test_gradual_is_not_cut_short_by_early_stopping(base) -> None:  # type: ignore[no-untyped-def]
    candidate, _ = _finetune(base, "gradual-3", strategy="gradual", epochs=3, gradual_epochs_per_block=1)
    assert candidate.cost.epochs_run == 3  # patience=1 would otherwise stop it during the head-only epochs
    model = build_model("resnet18", 5)
    assert candidate.cost.trainable_params == HEAD + _block_params(model, 2)


def test_full_uses_layer_wise_learning_rate_decay() -> None:
    model = build_model("resnet18", 5)
    cfg = FinetuneConfig(strategy="full", lr=1e-3, layer_decay=0.5)
    plan = plan_strategy(model, cfg)
    rates = [g["lr"] for g in plan.param_groups]
    assert rates == [1e-3 * 0.5**k for k in range(len(model.blocks()) + 1)]
    assert sum(p.numel() for g in plan.param_groups for p in g["params"]) == count_parameters(model)[1]


def test_lora_merge_gives_a_plain_torchvision_model_with_the_same_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 5)
    cfg = FinetuneConfig(strategy="lora", lora_rank=4, lora_alpha=8)
    plan = plan_strategy(model, cfg)
    trainable, total = count_parameters(model)
    assert HEAD < trainable < 0.05 * total
    assert all("lora_" in n for n, p in model.backbone.named_parameters() if p.requires_grad)
    optimizer = torch.optim.SGD([p for g in plan.param_groups for p in g["params"]], lr=0.5)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    model.train()
    freeze_batchnorm(model)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # adapters now non-zero: merging must actually change the base weights
    model.eval()
    with torch.no_grad():
        adapted = model(x)
    assert plan.finalize is not None
    plan.finalize()
    with torch.no_grad():
        merged = model(x)
    assert torch.allclose(adapted, merged, atol=1e-4)
    state = model.state_dict()
    assert not any("lora_" in k or "base_layer" in k for k in state)
    fresh = build_model("resnet18", 5)
    fresh.load_state_dict(state)  # strict
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x), merged, atol=1e-5)
    assert type(fresh.backbone.conv1) is torch.nn.Conv2d and type(model.backbone.conv1) is torch.nn.Conv2d
    merge_lora(model)  # idempotent on a plain model
