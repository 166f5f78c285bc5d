"""Plain PyTorch references for bench/baseline.py: the transfer-learning tutorial's loop and one
extraction pass, each reading the image files the way the tutorial does.

The tutorial (pytorch.org/tutorials/beginner/transfer_learning_tutorial) loads images with
``torchvision.datasets.ImageFolder`` and a ``DataLoader`` with worker processes, and applies
``Resize``, ``CenterCrop``, ``ToTensor`` and ``Normalize`` per image, in every epoch. Both
references here do the same, with torchvision's v2 transforms (the same resize, crop and
normalisation as the model's preprocessing) and as many loader workers as adaptflow decodes with
(the CPU budget), so both sides read the same files with the same number of processes.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

ARCH = "resnet18"


def image_folder(root: Path, files: Collection[Path], pre: Any) -> Any:
    """``ImageFolder(root)`` limited to ``files``, with the per-image eval transform."""
    from torchvision import datasets
    from torchvision.transforms import v2

    wanted = {str(p.resolve()) for p in files}
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(pre.resize_size, interpolation=v2.InterpolationMode(pre.interpolation), antialias=True),
            v2.CenterCrop(pre.input_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(pre.mean), list(pre.std)),
        ]
    )
    return datasets.ImageFolder(
        str(root), transform=transform, is_valid_file=lambda path: str(Path(path).resolve()) in wanted
    )


def loader(dataset: Any, batch: int, workers: int, shuffle: bool = False, seed: int = 0) -> DataLoader[Any]:
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=shuffle,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


def backbone_model(state: dict[str, torch.Tensor], classes: int, seed: int = 0) -> nn.Module:
    """torchvision's resnet18 with the backbone weights and a new ``fc`` (the only trainable part)."""
    from adaptflow.models.factory import build_torchvision

    torch.manual_seed(seed)
    model = build_torchvision(ARCH)
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False
    )
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected, (missing, unexpected)
    for param in model.parameters():
        param.requires_grad = False
    assert isinstance(model.fc, nn.Linear)
    model.fc = nn.Linear(model.fc.in_features, classes)
    return model


def extraction_pass(state: dict[str, torch.Tensor], images: Any, batch: int = 128, workers: int = 0) -> float:
    """Seconds for one pass over ``images`` (a dataset): files read, decoded and transformed by the
    loader, the backbone in eval mode under ``torch.inference_mode()``. Model built before the clock."""
    model = backbone_model(state, 2)
    model.fc = nn.Identity()
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader(images, batch, workers):
            model(x)
    return time.perf_counter() - start


def decoded_pass(state: dict[str, torch.Tensor], images: torch.Tensor, pre: Any, batch: int = 128) -> float:
    """Seconds for one backbone pass over already-decoded ``uint8`` images, normalised per batch."""
    from adaptflow.training.batches import eval_batches

    model = backbone_model(state, 2)
    model.fc = nn.Identity()
    model.eval()
    normalise = eval_batches(pre)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            model(normalise(images[i : i + batch]))
    return time.perf_counter() - start


@dataclass(frozen=True)
class TutorialRun:
    wall: float
    best_val_accuracy: float
    val_accuracy: tuple[float, ...]  # per epoch
    train_accuracy: tuple[float, ...]


def tutorial_loop(
    state: dict[str, torch.Tensor],
    train: Any,
    val: Any,
    classes: int,
    epochs: int,
    batch: int,
    lr: float,
    workers: int,
    bn: str = "train",
    seed: int = 0,
) -> TutorialRun:
    """The tutorial's "ConvNet as fixed feature extractor" and its ``train_model``: every image
    through the whole network in every epoch (``train``, ``val``: ImageFolder datasets)."""
    start = time.perf_counter()
    model = backbone_model(state, classes, seed)
    loaders = {
        "train": loader(train, batch, workers, shuffle=True, seed=seed),
        "val": loader(val, batch, workers),
    }
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    best_state, best_acc = copy.deepcopy(model.state_dict()), -1.0
    accuracy: dict[str, list[float]] = {"train": [], "val": []}
    for _ in range(epochs):
        for phase in ("train", "val"):
            if phase == "train":
                model.train()
                if bn == "eval":  # the backbone's BatchNorm on its running statistics: frozen features
                    model.eval()
            else:
                model.eval()
            correct, seen = 0, 0
            for x, labels in loaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(x)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                correct += int((outputs.argmax(1) == labels).sum())
                seen += len(labels)
            if phase == "train":
                scheduler.step()
            accuracy[phase].append(correct / max(seen, 1))
            if phase == "val" and accuracy["val"][-1] > best_acc:
                best_acc, best_state = accuracy["val"][-1], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    wall = time.perf_counter() - start
    return TutorialRun(wall, best_acc, tuple(accuracy["val"]), tuple(accuracy["train"]))
