"""Fine-tuning strategies. Every one starts from the baseline head (LP-FT: linear probe, then tune).

- ``linear_probe``: the backbone stays frozen; only the head trains (on augmented images).
- ``partial``: the last ``unfreeze_blocks`` backbone blocks and the head train.
- ``full``: everything trains, with layer-wise learning-rate decay (discriminative rates):
  the head at ``lr``, each earlier block at ``layer_decay`` times the next one's rate.
- ``gradual``: starts head-only and unfreezes one more block, top down, every
  ``gradual_epochs_per_block`` epochs (like Lightning's BackboneFinetuning).
- ``lora``: low-rank adapters (peft) on the backbone's conv and linear layers; merged into the
  weights after training so the exported model is a plain network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from adaptflow.config import FinetuneConfig
from adaptflow.models.factory import Classifier

log = logging.getLogger(__name__)


@dataclass
class StrategyPlan:
    param_groups: list[dict[str, Any]]
    on_epoch_start: Callable[[int], None] | None = None
    finalize: Callable[[], None] | None = None  # e.g. merge LoRA adapters


def _set_trainable(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _decayed_groups(model: Classifier, trainable_blocks: int, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """Head at lr; the k-th block from the top at lr * layer_decay**k."""
    groups: list[dict[str, Any]] = [{"params": list(model.head.parameters()), "lr": cfg.lr, "name": "head"}]
    blocks = model.blocks()
    for depth, block in enumerate(reversed(blocks[len(blocks) - trainable_blocks :]), start=1):
        params = list(block.parameters())
        if params:
            groups.append({"params": params, "lr": cfg.lr * cfg.layer_decay**depth, "name": f"block-{depth}"})
    covered = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.backbone.parameters() if id(p) not in covered]
    if trainable_blocks == len(blocks) and rest:
        # parameters outside the listed blocks (e.g. final convs) train at the deepest block's rate
        groups.append({"params": rest, "lr": cfg.lr * cfg.layer_decay ** (len(blocks) + 1), "name": "rest"})
    return groups


def plan_strategy(model: Classifier, cfg: FinetuneConfig) -> StrategyPlan:
    blocks = model.blocks()
    _set_trainable(model.backbone, False)
    _set_trainable(model.head, True)
    strategy = cfg.strategy
    if strategy == "linear_probe":
        return StrategyPlan([{"params": list(model.head.parameters()), "lr": cfg.lr, "name": "head"}])
    if strategy == "partial":
        n = min(cfg.unfreeze_blocks, len(blocks))
        for block in blocks[len(blocks) - n :]:
            _set_trainable(block, True)
        return StrategyPlan(_decayed_groups(model, n, cfg))
    if strategy == "full":
        _set_trainable(model.backbone, True)
        return StrategyPlan(_decayed_groups(model, len(blocks), cfg))
    if strategy == "gradual":
        groups = _decayed_groups(model, len(blocks), cfg)  # all groups known to the optimizer up front

        def unfreeze(epoch: int) -> None:
            n = min(len(blocks), (epoch - 1) // cfg.gradual_epochs_per_block)
            for i, block in enumerate(blocks):
                _set_trainable(block, i >= len(blocks) - n)
            log.info("gradual: epoch %d trains the head and the last %d of %d blocks", epoch, n, len(blocks))

        return StrategyPlan(groups, on_epoch_start=unfreeze)
    if strategy == "lora":
        return _plan_lora(model, cfg)
    raise ValueError(f"unknown strategy {strategy!r}")


def _plan_lora(model: Classifier, cfg: FinetuneConfig) -> StrategyPlan:
    from peft import LoraConfig, inject_adapter_in_model

    targets = sorted(
        name
        for name, module in model.backbone.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name and _lora_supported(module)
    )
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets, lora_dropout=0.0)
    inject_adapter_in_model(config, model.backbone)
    # peft marks only adapter weights trainable inside the backbone
    for name, p in model.backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    adapter = [p for n, p in model.backbone.named_parameters() if "lora_" in n]
    groups = [
        {"params": list(model.head.parameters()), "lr": cfg.lr, "name": "head"},
        {"params": adapter, "lr": cfg.lr, "name": "lora"},
    ]

    def merge() -> None:
        merge_lora(model)

    return StrategyPlan(groups, finalize=merge)


def _lora_supported(module: nn.Module) -> bool:
    # grouped/depthwise convolutions are not supported by LoRA's conv layer
    return not (isinstance(module, nn.Conv2d) and module.groups != 1)


def merge_lora(model: Classifier) -> None:
    """Folds every LoRA adapter into its base layer and restores plain torch modules."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.backbone.get_submodule(parent_name) if parent_name else model.backbone
            setattr(parent, child, module.get_base_layer())


def freeze_batchnorm(model: nn.Module) -> None:
    """Keeps BatchNorm running statistics as pretrained (small data would skew them)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def freeze_frozen_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers whose parameters are frozen keep their running statistics too.

    Without this, ``freeze_bn=false`` would let a "frozen" backbone (linear_probe, the blocks
    that partial or gradual have not unfrozen yet) drift through its running statistics.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()


def schedule_epochs(model: Classifier, cfg: FinetuneConfig) -> int:
    """Epochs a strategy needs before early stopping may end it (gradual: until every block trains)."""
    if cfg.strategy == "gradual":
        return len(model.blocks()) * cfg.gradual_epochs_per_block + 1
    return 0
