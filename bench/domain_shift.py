"""Domain shift on real pairs: do the advisor's shift signals rank cross-dataset above in-domain? (issue 9, item 5)

Two source backbones, each pretrained here with ``adaptflow pretrain``:

- **digits**: the demo's backbone (scikit-learn digits 0-4, :func:`adaptflow.demo.prepare_demo`);
- **fashion**: bench/real_data.py's backbone (Fashion-MNIST classes 0-4, every training image).

Each is applied to every target: the other dataset's classes (cross-dataset), its own dataset's
other classes (in-domain), the demo's input-shifted digits (inverted + rotated, texture-drawn), and
its own source classes (the floor). For each pair and seed, ``--per-class`` training images per
class are drawn, and both advisor signals are measured with the library's own functions:

- ``domain_shift``: the frozen backbone's BatchNorm-statistics KL (:mod:`adaptflow.training.shift`);
- ``transfer_gap``: chance-corrected source accuracy minus a cross-validated linear probe's
  (:mod:`adaptflow.training.transfer_gap`).

    .venv/bin/python bench/domain_shift.py [--workdir .adaptflow/shift-pairs]
        [--fashion-workdir .adaptflow/real-data] [--per-class 60] [--seeds 3] [--no-write]

Writes a table into bench/RESULTS.md under "Domain shift on real pairs".
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence import provenance, write_results
from fashion_mnist import SOURCE_CLASSES, TARGET_CLASSES, draw, find_dataset_dir, load_split, write_tree
from real_data import pretrain_source

HEADING = "## Domain shift on real pairs"
# (backbone, target, kind): the kinds the signals must order
PAIRS = (
    ("digits", "digits 0-4", "source"),
    ("digits", "digits 5-9", "in-domain"),
    ("digits", "digits 5-9 inverted+rotated", "input shift"),
    ("digits", "digits 5-9 texture", "input shift"),
    ("digits", "fashion 0-4", "cross-dataset"),
    ("digits", "fashion 5-9", "cross-dataset"),
    ("fashion", "fashion 0-4", "source"),
    ("fashion", "fashion 5-9", "in-domain"),
    ("fashion", "digits 0-4", "cross-dataset"),
    ("fashion", "digits 5-9", "cross-dataset"),
    ("fashion", "digits 5-9 texture", "cross-dataset"),
)
SIGNALS = ("domain_shift", "transfer_gap")


@dataclass(frozen=True)
class Row:
    backbone: str
    target: str
    kind: str
    values: dict[str, list[float]]  # signal -> one value per seed
    probe: list[float]


def trees(
    workdir: Path, fashion_workdir: Path, pretrain_epochs: int
) -> tuple[dict[str, Path], dict[str, Path]]:
    """(backbone name -> weights file, target name -> ImageFolder); made once and cached."""
    from adaptflow.demo import prepare_demo

    demo = prepare_demo(workdir)
    train_x, train_y = load_split(find_dataset_dir(), "train")
    fashion = pretrain_source(fashion_workdir, train_x, train_y, pretrain_epochs)
    # 300 per class is plenty for --per-class draws and far from the seeds' 250-image target draws
    pool = {
        "fashion 0-4": draw(train_y, 300, 1234, SOURCE_CLASSES),
        "fashion 5-9": draw(train_y, 300, 1234, TARGET_CLASSES),
    }
    targets = {
        name: write_tree(workdir / name.replace(" ", "-"), train_x, train_y, idx, "train")
        for name, idx in pool.items()
    }
    targets |= {
        "digits 0-4": demo.data / "source",
        "digits 5-9": demo.data / "target",
        "digits 5-9 inverted+rotated": demo.data / "target-shifted",
        "digits 5-9 texture": demo.data / "target-texture",
    }
    return {"digits": demo.weights, "fashion": Path(fashion["uri"].removeprefix("file://"))}, targets


def measure(
    weights: Path, target: Path, per_class: int, seed: int
) -> tuple[float | None, float | None, float | None]:
    """(domain_shift, transfer_gap, probe accuracy) of one backbone on a seeded draw of one target."""
    import json

    import torch
    from PIL import Image

    from adaptflow.config import BackboneSpec
    from adaptflow.data.images import eval_transform
    from adaptflow.models.factory import build_model
    from adaptflow.models.weights import resolve_weights
    from adaptflow.training.shift import batchnorm_shift
    from adaptflow.training.transfer_gap import probe_cv_accuracy, source_task, transfer_gap

    sha = json.loads(weights.with_name(weights.name + ".json").read_text())["sha256"]
    spec = BackboneSpec(name="resnet18", weights_uri=weights.resolve().as_uri(), sha256=sha)
    resolved = resolve_weights(spec, weights.parent / "cache")
    classes = sorted(p.name for p in target.iterdir() if p.is_dir())
    model = build_model("resnet18", len(classes))
    model.load_backbone_state(resolved.state_dict or {})
    model.eval()
    rng = np.random.default_rng(seed)
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted((target / name).glob("*.png"))
        files += [found[i] for i in np.sort(rng.permutation(len(found))[:per_class])]
        labels += [index] * min(per_class, len(found))
    transform = eval_transform(resolved.preprocessing)
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    device = torch.device("cpu")
    shift = batchnorm_shift(model.backbone, x.split(64), device)
    with torch.no_grad():
        features = model.backbone(x).flatten(1).numpy()
    probe = probe_cv_accuracy(features, np.array(labels), seed)
    source = source_task(resolved.meta)
    gap = None if probe is None or source is None else transfer_gap(probe, len(classes), source)
    return shift, gap, probe


def run(workdir: Path, fashion_workdir: Path, per_class: int, seeds: int, pretrain_epochs: int) -> list[Row]:
    backbones, targets = trees(workdir, fashion_workdir, pretrain_epochs)
    rows = []
    for backbone, target, kind in PAIRS:
        values: dict[str, list[float]] = {s: [] for s in SIGNALS}
        probes = []
        for seed in range(seeds):
            shift, gap, probe = measure(backbones[backbone], targets[target], per_class, seed)
            for name, value in zip(SIGNALS, (shift, gap), strict=True):
                if value is not None:
                    values[name].append(value)
            if probe is not None:
                probes.append(probe)
        rows.append(Row(backbone, target, kind, values, probes))
        print(f"{backbone} -> {target}: " + ", ".join(f"{k} {mean(v):.3f}" for k, v in values.items() if v))
    return rows


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{mean(values):.3f} ± {stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def ranks_cross_above_in_domain(rows: list[Row], signal: str) -> tuple[bool, str]:
    """Per backbone: does every cross-dataset pair score above the in-domain pair (means)?"""
    verdicts, ok = [], True
    for backbone in dict.fromkeys(r.backbone for r in rows):
        own = [r for r in rows if r.backbone == backbone and r.values[signal]]
        inside = max((mean(r.values[signal]) for r in own if r.kind == "in-domain"), default=None)
        cross = [(mean(r.values[signal]), r.target) for r in own if r.kind == "cross-dataset"]
        if inside is None or not cross:
            continue
        lowest, name = min(cross)
        passed = lowest > inside
        ok &= passed
        verdicts.append(
            f"{backbone}: lowest cross-dataset {lowest:.3f} ({name}) {'>' if passed else '<='} in-domain {inside:.3f}"
        )
    return ok, "; ".join(verdicts)


def markdown(rows: list[Row], command: str, seconds: float, per_class: int, seeds: int) -> str:
    lines = [
        *provenance(HEADING, command),
        f"- total wall time: {seconds:.0f} s",
        f"- sample: {per_class} training images per class of each target, seeds 0-{seeds - 1} (a new draw and "
        "new cross-validation folds per seed); mean ± sd over the seeds",
        "- backbones: resnet18 pretrained with `adaptflow pretrain` on digits 0-4 (the demo's, scikit-learn digits "
        "8x8 drawn at 32 px) and on Fashion-MNIST 0-4 (bench/real_data.py's, all 30000 training images)",
        "- domain_shift: BatchNorm-statistics KL of the frozen backbone; transfer_gap: chance-corrected source "
        "accuracy minus a 5-fold logistic-regression probe's on the frozen features (the probe's accuracy in "
        "the last column)",
        "",
        "| backbone | target | kind | domain_shift | transfer_gap | probe accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.backbone} | {r.target} | {r.kind} | {_cell(r.values['domain_shift'])} | "
            f"{_cell(r.values['transfer_gap'])} | {_cell(r.probe)} |"
        )
    lines.append("")
    for signal in SIGNALS:
        ok, why = ranks_cross_above_in_domain(rows, signal)
        lines.append(
            f"**Does `{signal}` rank every cross-dataset pair above in-domain?** {'yes' if ok else 'no'}: {why}."
        )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(".adaptflow/shift-pairs"))
    parser.add_argument("--fashion-workdir", type=Path, default=Path(".adaptflow/real-data"))
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = run(args.workdir, args.fashion_workdir, args.per_class, args.seeds, args.pretrain_epochs)
    command = "python bench/domain_shift.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(rows, command.strip(), time.perf_counter() - start, args.per_class, args.seeds)
    print(section)
    if not args.no_write:
        write_results(section, Path(__file__).resolve().parent / "RESULTS.md", HEADING)


if __name__ == "__main__":
    main()
