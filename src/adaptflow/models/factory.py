"""One model factory (DESIGN.md): ``build_model(name, num_classes)`` looks backbones up by name.

A :class:`Classifier` is a torchvision backbone with its own head removed (it yields pooled
features) plus a fresh linear ``head``. ``blocks()`` lists the backbone's stages from input to
output, which is what partial and gradual unfreezing and discriminative learning rates need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from adaptflow.errors import ConfigError


@dataclass(frozen=True)
class BackboneDef:
    name: str
    #: the torchvision builder (``torchvision.models.<name>``), called with weights=None
    builder: str
    #: attribute path of the torchvision head that we replace with Identity
    head_attr: str
    feature_dim: int
    #: returns the stages of the (headless) torchvision model, input to output
    blocks: Callable[[nn.Module], list[nn.Module]]


def _child(m: nn.Module, name: str) -> nn.Module:
    return m.get_submodule(name)


def _resnet_blocks(m: nn.Module) -> list[nn.Module]:
    stem = nn.ModuleList([_child(m, "conv1"), _child(m, "bn1")])
    return [stem, *(_child(m, f"layer{i}") for i in range(1, 5))]


def _features_blocks(m: nn.Module) -> list[nn.Module]:
    return list(_child(m, "features").children())


BACKBONES: dict[str, BackboneDef] = {}


def register_backbone(spec: BackboneDef) -> None:
    if spec.name in BACKBONES:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    BACKBONES[spec.name] = spec


for _spec in (
    BackboneDef("resnet18", "resnet18", "fc", 512, _resnet_blocks),
    BackboneDef("resnet34", "resnet34", "fc", 512, _resnet_blocks),
    BackboneDef("resnet50", "resnet50", "fc", 2048, _resnet_blocks),
    BackboneDef("mobilenet_v3_small", "mobilenet_v3_small", "classifier", 576, _features_blocks),
    BackboneDef("mobilenet_v3_large", "mobilenet_v3_large", "classifier", 960, _features_blocks),
    BackboneDef("efficientnet_b0", "efficientnet_b0", "classifier", 1280, _features_blocks),
):
    register_backbone(_spec)


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def backbone_def(name: str) -> BackboneDef:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(
            f"unknown backbone {name!r}", hint=f"valid backbones: {', '.join(list_backbones())}"
        ) from None


def build_torchvision(name: str, num_classes: int | None = None) -> nn.Module:
    """The plain torchvision architecture (with its own head), randomly initialised."""
    import torchvision

    spec = backbone_def(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model: nn.Module = getattr(torchvision.models, spec.builder)(weights=None, **kwargs)
    return model


class Classifier(nn.Module):
    """Headless backbone -> pooled features -> linear head."""

    def __init__(self, backbone_name: str, num_classes: int) -> None:
        super().__init__()
        spec = backbone_def(backbone_name)
        self.backbone_name = backbone_name
        self.backbone = build_torchvision(backbone_name)
        setattr(self.backbone, spec.head_attr, nn.Identity())
        self.head = nn.Linear(spec.feature_dim, num_classes)
        self.feature_dim = spec.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.backbone(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone(x))
        return out

    def blocks(self) -> list[nn.Module]:
        return backbone_def(self.backbone_name).blocks(self.backbone)

    def load_backbone_state(self, state: dict[str, torch.Tensor]) -> None:
        """Loads a torchvision state dict (its own head's keys are ignored); any other mismatch is an error."""
        spec = backbone_def(self.backbone_name)
        head_prefix = spec.head_attr + "."
        filtered = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
        result = self.backbone.load_state_dict(filtered, strict=False)
        missing = list(result.missing_keys)
        if missing or result.unexpected_keys:
            from adaptflow.errors import WeightsError

            raise WeightsError(
                f"weights do not fit {self.backbone_name}: missing {missing[:5]}, "
                f"unexpected {list(result.unexpected_keys)[:5]}",
                hint="check backbone.name matches the architecture the weights were trained for",
            )


def build_model(name: str, num_classes: int) -> Classifier:
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    return Classifier(name, num_classes)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
