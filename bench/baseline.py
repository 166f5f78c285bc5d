"""The baseline stage against the PyTorch tutorial's frozen-backbone loop (issue 12).

The PyTorch transfer-learning tutorial's "ConvNet as fixed feature extractor" freezes the backbone
(``requires_grad = False``), puts a new ``fc`` on it and trains that with
``SGD(lr=0.001, momentum=0.9)`` and ``StepLR(step_size=7, gamma=0.1)``, pushing every image through
the whole network in every epoch (and the validation images once per epoch). adaptflow's baseline
stage (``run_baseline``) pushes each image through the backbone once, caches the features and fits
the head on them. All of it runs in ONE process, interleaved round after round (the order rotated
each round), with the same torch threads (``adaptflow.cpus.configure_threads()``, called once):

- **tutorial**: ``--epochs`` epochs as the tutorial's ``train_model`` runs them: ``model.train()``
  (BatchNorm on batch statistics, as written; ``--tutorial-bn eval`` keeps it on the running ones),
  a train phase and a validation phase per epoch, the best validation epoch's weights kept. It
  gets the bench's already-decoded ``uint8`` tensors through a plain ``TensorDataset`` and
  ``DataLoader``, scaled and normalised per batch as adaptflow does, so its wall excludes
  decoding: the comparison is about backbone passes. No augmentation (both sides see the same
  pixels). Batch ``--tutorial-batch`` (the tutorial's own is 4; default 128, the feature batch,
  so a pass costs the same on both sides).
- **adaptflow**: ``run_baseline`` with the default config, a fresh feature cache and a fresh
  decoded-image cache each round; wall = ``perf_counter`` around it: decoding, the extraction pass
  (BatchNorm shift measured in it), the probe, the probe's cross-validation, the fine-tuning cost
  estimate and the candidate written. The split is timed here by wrapping the library functions
  ``run_baseline`` calls; the backbone forwards are counted by a forward hook on its backbone.
- **one extraction pass**: the backbone over the same train+val images, already decoded, in eval
  mode under ``torch.inference_mode()``, batches of 128, each batch scaled and normalised first
  (``eval_batches``); the model is built before the clock starts; no cache writes.

Goals: speedup (tutorial wall / adaptflow wall) at least 0.8 x epochs; adaptflow wall / one
extraction pass at most 1.2 at 5,000 training images or more; validation accuracies within 1 point.

Data: Fashion-MNIST classes 5-9 (Debian's ``dataset-fashion-mnist``), ``--images`` drawn from the
official training set, written as PNG and ingested by adaptflow (default splits: about 65 % train).
Backbone: ``--backbone-file`` (an adaptflow weights file, e.g. the Fashion source weights of
bench/real_data.py), else ``--random-init`` (random ResNet-18 at 32 px: a valid speed comparison,
and both sides still get the same features), else the demo's digits-pretrained ResNet-18
(``adaptflow.demo.prepare_demo``, pretrained once under ``--workdir``).

Usage: ``python bench/baseline.py [--images 8000] [--epochs 5] [--rounds 5] [--tutorial-batch 128]
[--tutorial-bn train] [--backbone-file F | --random-init] [--workdir .adaptflow/bench-baseline] [--no-write]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import logging
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence import provenance, publish
from fashion_mnist import CLASS_NAMES, TARGET_CLASSES, draw, find_dataset_dir, load_split, write_tree

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Baseline against the tutorial loop (issue 12)"
ARCH = "resnet18"
SIDES = ("tutorial", "adaptflow", "extraction pass")
#: the baseline stage's parts: name in the split -> the function ``run_baseline`` calls for it
PARTS = {
    "decode": "decode_split",
    "extraction (+ BatchNorm shift)": "extract_features",
    "linear probe": "train_linear_probe",
    "probe cross-validation": "measure_transfer_gap",
    "fine-tuning cost estimate": "measure_finetune_cost",
    "candidate saved": "save_candidate",
}
GOAL_IMAGES = 5000

log = logging.getLogger("bench.baseline")


# ------------------------------------------------------------------------------ data, backbone
def fashion_snapshot(workdir: Path, images: int) -> Any:
    """``images`` Fashion-MNIST training images of classes 5-9 (``images // 5`` per class, seeded
    draw), written once as an ImageFolder of PNGs under ``workdir`` and ingested with the defaults."""
    from adaptflow.config import IngestConfig
    from adaptflow.data.ingest import ingest

    x, y = load_split(find_dataset_dir(), "train")
    tree = write_tree(workdir / f"fmnist-target-{images}", x, y, draw(y, images // 5, seed=0), "train")
    return ingest(str(tree), IngestConfig())


@dataclass(frozen=True)
class Backbone:
    file: Path
    sha256: str
    description: str


def backbone_weights(workdir: Path, backbone_file: Path | None, random_init: bool) -> Backbone:
    """The weights file both sides load: given, random (written here), or the demo's pretrained one."""
    from adaptflow.storage import sha256_file

    if backbone_file is not None:
        sidecar = backbone_file.with_name(backbone_file.name + ".json")
        info = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        sha = info.get("sha256") or sha256_file(backbone_file)
        what = f"{backbone_file.name}" + (
            f" (pretrained on {', '.join(map(str, info['source_classes']))})"
            if info.get("source_classes")
            else ""
        )
        return Backbone(backbone_file, sha, what)
    if random_init:
        from adaptflow.contracts import Preprocessing
        from adaptflow.models.factory import build_torchvision
        from adaptflow.models.weights import IMAGENET_MEAN, IMAGENET_STD, save_weights_file

        torch.manual_seed(0)
        pre = Preprocessing(input_size=32, resize_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        path = workdir / "random-resnet18.safetensors"
        meta = {"architecture": ARCH, "preprocessing": pre.model_dump(mode="json")}
        sha = save_weights_file(build_torchvision(ARCH).state_dict(), path, meta)
        return Backbone(path, sha, "random init (torch seed 0), 32 px, ImageNet mean/std")
    from adaptflow.demo import prepare_demo

    assets = prepare_demo(workdir / "demo-home")
    return Backbone(assets.weights, assets.sha256, "the demo's digits-pretrained resnet18 (digits 0-4)")


def settings_for(workdir: Path, backbone: Backbone, input_size: int | None = None) -> Any:
    from adaptflow.config import load_settings

    return load_settings(
        overrides=[
            f"workdir={workdir}",
            "seed=0",
            f"backbone.name={ARCH}",
            f"backbone.weights_uri={backbone.file.resolve().as_uri()}",
            f"backbone.sha256={backbone.sha256}",
            *([f"backbone.input_size={input_size}"] if input_size else []),
        ]
    )


# ------------------------------------------------------------------- the baseline stage, timed
@dataclass
class StageClock:
    """Seconds in each of ``PARTS`` and images through the stage's backbone (``copies``: through the
    cost estimate's deep copy of the model, which the hook follows into)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    forwards: int = 0
    copies: int = 0


@contextlib.contextmanager
def stage_clock() -> Iterator[StageClock]:
    """Wraps the functions ``run_baseline`` calls (module attributes of adaptflow.training.baseline)."""
    import adaptflow.training.baseline as stage

    clock = StageClock()
    originals: dict[str, Callable[..., Any]] = {name: getattr(stage, name) for name in PARTS.values()}
    build = stage.build_model

    def timed(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock.seconds[part] += time.perf_counter() - start

        return wrapper

    def build_counted(name: str, num_classes: int) -> Any:
        model = build(name, num_classes)
        original = model.backbone

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if module is original:
                clock.forwards += len(args[0])
            else:
                clock.copies += len(args[0])

        original.register_forward_hook(hook)
        return model

    for part, name in PARTS.items():
        setattr(stage, name, timed(part, originals[name]))
    stage.build_model = build_counted  # type: ignore[assignment]
    try:
        yield clock
    finally:
        for name, fn in originals.items():
            setattr(stage, name, fn)
        stage.build_model = build  # type: ignore[assignment]


@dataclass(frozen=True)
class StageRun:
    wall: float
    result: Any  # BaselineResult
    clock: StageClock


def run_stage(snapshot: Any, settings: Any, weights: Any, scratch: Path) -> StageRun:
    """``run_baseline`` with a fresh feature cache and a fresh decoded-image cache under ``scratch``."""
    from adaptflow.data.images import ImageStore
    from adaptflow.training.baseline import BaselineInputs, run_baseline

    inputs = BaselineInputs(
        snapshot,
        settings.backbone,
        weights,
        settings.baseline,
        settings.finetune,
        scratch / "features",
        settings.seed,
        scratch / "decoded",
    )
    with stage_clock() as clock:
        start = time.perf_counter()
        result = run_baseline(inputs, scratch / "baseline", ImageStore())
        wall = time.perf_counter() - start
    return StageRun(wall, result, clock)


# ------------------------------------------------------------------------- the two references
def extraction_pass(
    state: dict[str, torch.Tensor], images: torch.Tensor, pre: Any, batch: int = 128
) -> float:
    """Seconds for one pass of the backbone over ``images`` (uint8), eval mode, inference mode."""
    from adaptflow.models.factory import build_model
    from adaptflow.training.batches import eval_batches

    model = build_model(ARCH, 2)
    model.load_backbone_state(state)
    model.eval()
    normalise = eval_batches(pre)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            model.features(normalise(images[i : i + batch]))
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
    pre: Any,
    classes: int,
    epochs: int,
    batch: int,
    lr: float,
    bn: str = "train",
    seed: int = 0,
) -> TutorialRun:
    """The tutorial's "ConvNet as fixed feature extractor" and its ``train_model``, on decoded tensors."""
    from torch.utils.data import DataLoader, TensorDataset

    from adaptflow.models.factory import build_torchvision
    from adaptflow.training.batches import eval_batches

    start = time.perf_counter()
    torch.manual_seed(seed)
    model = build_torchvision(ARCH)
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False
    )
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected, (missing, unexpected)
    for param in model.parameters():
        param.requires_grad = False
    assert isinstance(model.fc, nn.Linear)
    model.fc = nn.Linear(model.fc.in_features, classes)  # the new head: the only trainable parameters
    normalise = eval_batches(pre)
    loaders = {
        "train": DataLoader(
            TensorDataset(train.images, train.labels),
            batch_size=batch,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        ),
        "val": DataLoader(TensorDataset(val.images, val.labels), batch_size=batch),
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
            for inputs, labels in loaders[phase]:
                x = normalise(inputs)
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


# ----------------------------------------------------------------------------------- the bench
def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return ", ".join(fmt.format(v) for v in values)


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8000, help="Fashion-MNIST images drawn (~65%% train)")
    parser.add_argument("--epochs", type=int, default=5, help="the tutorial loop's epochs (E)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tutorial-batch", type=int, default=128)
    parser.add_argument("--tutorial-lr", type=float, default=0.001)
    parser.add_argument("--tutorial-bn", choices=("train", "eval"), default="train")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--backbone-file", type=Path, help="an adaptflow weights file (resnet18)")
    source.add_argument("--random-init", action="store_true", help="a random resnet18 at 32 px")
    parser.add_argument("--size", type=int, default=None, help="input size in px (default: the backbone's)")
    parser.add_argument("--workdir", type=Path, default=Path(".adaptflow/bench-baseline"))
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from adaptflow.cpus import configure_threads
    from adaptflow.data.images import ImageStore
    from adaptflow.models.weights import resolve_weights
    from adaptflow.training.decoded import DecodedImages, decode_split

    threads = configure_threads()
    heading = HEADING if args.size is None else f"{HEADING} at {args.size} px"
    args.workdir.mkdir(parents=True, exist_ok=True)
    snapshot = fashion_snapshot(args.workdir, args.images)
    backbone = backbone_weights(args.workdir, args.backbone_file, args.random_init)
    settings = settings_for(args.workdir, backbone, args.size)
    weights = resolve_weights(settings.backbone, args.workdir / "weights")
    assert weights.state_dict is not None
    pre, classes = weights.preprocessing, snapshot.class_names
    train_entries, val_entries = snapshot.split("train"), snapshot.split("val")
    n_train, n_val = len(train_entries), len(val_entries)
    unique = len({e.sha256 for e in train_entries + val_entries})

    start = time.perf_counter()
    store = ImageStore()
    train = decode_split(train_entries, classes, pre, store)
    val = decode_split(val_entries, classes, pre, store)
    decode_seconds = time.perf_counter() - start
    both = DecodedImages(torch.cat([train.images, val.images]), torch.cat([train.labels, val.labels]))
    print(
        f"{n_train} train + {n_val} val images at {pre.input_size} px, decoded in {decode_seconds:.1f} s; "
        f"{threads} torch threads",
        flush=True,
    )

    extraction_pass(weights.state_dict, both.images[:256], pre)  # warm-up, untimed: first-call costs
    walls: dict[str, list[float]] = {side: [] for side in SIDES}
    parts: dict[str, list[float]] = {part: [] for part in PARTS}
    other: list[float] = []
    stage_walls: list[float] = []  # the candidate's own cost.wall_seconds
    accuracy: dict[str, list[float]] = {"tutorial": [], "adaptflow": []}
    forwards: list[int] = []
    reported: list[int] = []
    copies: list[int] = []
    tutorial_curve: TutorialRun | None = None
    for round_ in range(args.rounds):
        order = SIDES[round_ % len(SIDES) :] + SIDES[: round_ % len(SIDES)]
        for side in order:
            if side == "tutorial":
                run = tutorial_loop(
                    weights.state_dict,
                    train,
                    val,
                    pre,
                    len(classes),
                    args.epochs,
                    args.tutorial_batch,
                    args.tutorial_lr,
                    args.tutorial_bn,
                )
                walls[side].append(run.wall)
                accuracy["tutorial"].append(run.best_val_accuracy)
                tutorial_curve = run
            elif side == "adaptflow":
                with tempfile.TemporaryDirectory(dir=args.workdir, prefix="round-") as scratch:
                    stage = run_stage(snapshot, settings, weights, Path(scratch))
                walls[side].append(stage.wall)
                stage_walls.append(stage.result.candidate.cost.wall_seconds)
                for part in PARTS:
                    parts[part].append(stage.clock.seconds[part])
                other.append(stage.wall - sum(stage.clock.seconds.values()))
                accuracy["adaptflow"].append(stage.result.candidate.metrics["val_accuracy"])
                forwards.append(stage.clock.forwards)
                reported.append(stage.result.candidate.cost.backbone_forward_images)
                copies.append(stage.clock.copies)
            else:
                walls[side].append(extraction_pass(weights.state_dict, both.images, pre))
            print(f"round {round_ + 1}: {side:16s} {walls[side][-1]:7.2f} s", flush=True)

    tut, ada, ext = (med(walls[s]) for s in SIDES)
    decode_in_stage = med(parts["decode"])
    speedup, goal_speedup = tut / ada, 0.8 * args.epochs
    per_pass = ada / ext
    acc_tut, acc_ada = med(accuracy["tutorial"]), med(accuracy["adaptflow"])
    diff = 100 * (acc_ada - acc_tut)
    per_image = med([r / unique for r in reported])
    hooked = med([f / unique for f in forwards])
    ratio_goal = (
        verdict(per_pass <= 1.2)
        if n_train >= GOAL_IMAGES
        else f"n/a: {n_train} < {GOAL_IMAGES:,} train images"
    )
    command = shlex.join(["python", "bench/baseline.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        *provenance(heading, command),
        f"- data: Fashion-MNIST classes 5-9 ({', '.join(CLASS_NAMES[c] for c in TARGET_CLASSES)}), "
        f"{args.images} images drawn (seed 0) from the official training set, written as PNG and ingested "
        f"by adaptflow (default splits): {n_train} train + {n_val} val images ({unique} unique), "
        f"{pre.input_size} px; test split unused",
        f"- backbone: {ARCH}, {backbone.description}, sha256 {backbone.sha256[:12]}",
        f"- one process, {threads} torch threads (`configure_threads()`), the three sides interleaved "
        f"(order rotated each round), median of {args.rounds} rounds",
        "- **adaptflow**: `run_baseline` with the default config, a fresh feature cache and a fresh "
        "decoded-image cache each round; wall = everything it does: decode, the extraction pass (BatchNorm "
        "shift measured in it, features written to the cache), the L-BFGS linear probe, the probe's "
        "cross-validation, the fine-tuning cost estimate (timed train steps and one validation pass on a "
        "copy of the model) and the candidate saved",
        "- **tutorial**: the PyTorch transfer-learning tutorial's fixed-feature-extractor loop: backbone "
        f"`requires_grad=False`, new `fc`, `SGD(fc, lr={args.tutorial_lr:g}, momentum=0.9)`, "
        f"`StepLR(7, 0.1)`, {args.epochs} epoch(s) of a train phase (BatchNorm in {args.tutorial_bn} mode"
        + (", as `model.train()` leaves it in the tutorial" if args.tutorial_bn == "train" else "")
        + f") and a validation phase, best-val-epoch weights kept; batch {args.tutorial_batch} (the "
        "tutorial's is 4); no augmentation. It is fed the bench's already-decoded uint8 tensors "
        "(`TensorDataset` + `DataLoader`), normalised per batch as adaptflow does: its wall excludes "
        "decoding, so the ratio is about backbone passes",
        "- **one extraction pass**: the backbone over the same train+val images, already decoded, eval "
        "mode, `torch.inference_mode()`, batches of 128, each batch scaled and normalised "
        "(`eval_batches`); model built before the clock, no cache writes",
        "",
        "| measure | median | rounds | goal |",
        "|---|---|---|---|",
        f"| tutorial loop wall, {args.epochs} epoch{'s' if args.epochs != 1 else ''} | {tut:.2f} s | {spread(walls['tutorial'])} | |",
        f"| adaptflow baseline stage wall | {ada:.2f} s | {spread(walls['adaptflow'])} | |",
        f"| one extraction pass, train+val | {ext:.2f} s | {spread(walls['extraction pass'], '{:.2f}')} | |",
        "| decode train+val once (the bench's, in memory; not in the tutorial's wall) "
        f"| {decode_seconds:.2f} s | 1 | |",
        f"| **speedup**: tutorial / adaptflow | {speedup:.2f}x | "
        f"| >= 0.8 x {args.epochs} = {goal_speedup:.1f}x: {verdict(speedup >= goal_speedup)} |",
        f"| speedup with the tutorial charged one decode | {(tut + decode_seconds) / ada:.2f}x | | |",
        f"| **adaptflow wall / one extraction pass** | {per_pass:.2f} | "
        f"| <= 1.2 at >= {GOAL_IMAGES:,} train images: {ratio_goal} |",
        "| adaptflow wall without its decode / one extraction pass "
        f"| {(ada - decode_in_stage) / ext:.2f} | | |",
        f"| val accuracy, adaptflow (probe) | {acc_ada:.4f} | {spread(accuracy['adaptflow'], '{:.4f}')} | |",
        f"| val accuracy, tutorial (best epoch) | {acc_tut:.4f} "
        f"| {spread(accuracy['tutorial'], '{:.4f}')} | |",
        f"| accuracy difference, adaptflow - tutorial | {diff:+.2f} points | | within 1 point: "
        f"{verdict(abs(diff) <= 1.0)} |",
        f"| backbone forwards per image, adaptflow (`cost.backbone_forward_images` / {unique}) "
        f"| {per_image:.3f} | | 1: {verdict(per_image == 1)} |",
        f"| the same, counted by a forward hook on the stage's backbone | {hooked:.3f} | | |",
        f"| images through the cost estimate's copy of the model (train steps + one val pass) | "
        f"{med([float(c) for c in copies]):.0f} | | |",
    ]
    if tutorial_curve is not None:
        lines += [
            "",
            "Tutorial loop, last round, per epoch: train accuracy "
            f"{spread(list(tutorial_curve.train_accuracy), '{:.3f}')}; "
            f"val accuracy {spread(list(tutorial_curve.val_accuracy), '{:.3f}')}.",
        ]
    lines += [
        "",
        "Where the baseline stage's wall goes (timed by wrapping the functions `run_baseline` calls):",
        "",
        "| part | seconds (median) | share of the stage wall | x one extraction pass |",
        "|---|---|---|---|",
    ]
    for part in PARTS:
        s = med(parts[part])
        lines.append(f"| {part} | {s:.2f} | {100 * s / ada:.0f} % | {s / ext:.2f} |")
    lines.append(
        f"| other (model built, weights loaded, signals, advisor) | {med(other):.2f} | "
        f"{100 * med(other) / ada:.0f} % | {med(other) / ext:.2f} |"
    )
    lines.append(
        f"| stage wall (`cost.wall_seconds`, from its own clock) | {med(stage_walls):.2f} | "
        f"| {med(stage_walls) / ext:.2f} |"
    )
    publish(lines, heading, write=not args.no_write, path=RESULTS)


if __name__ == "__main__":
    main()
