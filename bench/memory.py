"""Memory: each stage's peak RSS against its parts (model, optimizer, one batch, activations, features).

The baseline stage (``baseline_for``) and the fine-tuning stage (``compare.train_strategy``, strategy
``full``) run on a small demo set (the digits ``target`` tree: 5 classes, ``--per-class`` images each,
``--size`` px), each in a fresh process, so a stage's peak is its own. The peak is the figure the stage
records itself (``CostFigures.peak_memory_mb``: ``VmHWM`` after ``reset_peak_memory``; on CUDA,
``torch.cuda.max_memory_allocated``), median of ``--rounds`` rounds; every round uses a fresh workdir,
so no stage finds features or decoded images cached by an earlier round.

The parts are computed, not measured:

- import baseline: the RSS of a process that imports only what the stage processes import;
- model: parameters and buffers (the baseline holds two: its own and the cost estimate's copy);
- grads + AdamW: one gradient and two moments per trainable parameter (``full``: all of them; the
  baseline's cost estimate trains a copy for a few steps, so it holds these too);
- batch: the largest float32 input batch (feature extraction or a training step);
- activations: what autograd saves for backward in one training step (``saved_tensors_hooks``,
  each storage counted once);
- features: ``N x D x 4`` bytes (train + val, baseline only);
- decoded images: ``N x 3 x S x S`` uint8 (train + val), held by stages that decode once;
- library code: mapped files (``RssFile``: torch's kernels, oneDNN, ...) the stage paged in beyond the
  import baseline's; measured at the stage's end, as pages of code stay resident once touched.

Unexplained is the peak less the parts: allocator caches and fragmentation, oneDNN scratch, the
DataLoader, Python objects, and whatever the parts model too coarsely.

Usage: ``python bench/memory.py [--rounds 5] [--per-class 40] [--size 32] [--epochs 2] [--no-write]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from evidence import provenance, write_results

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Memory: peak RSS of each stage against its parts (issue 12)"
MB = 2**20
STAGES = ("baseline", "finetune")
#: what a stage process imports before its stage starts; the import baseline imports the same
STAGE_IMPORTS = ("torch", "torchvision", "adaptflow.compare", "adaptflow.training.baseline")


def settings_for(workdir: Path, args: argparse.Namespace) -> Any:
    from adaptflow.config import load_settings

    return load_settings(
        overrides=[
            f"workdir={workdir}",
            "backbone.weights=none",  # no download; random weights use the same memory
            f"backbone.input_size={args.size}",
            "baseline.advisor.choose_strategy=false",  # finetune.strategy (full) in both stages
            f"finetune.epochs={args.epochs}",
            f"finetune.patience={args.epochs}",
            f"finetune.device={args.device}",
        ]
    )


def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def child(stage: str, work: Path, snapshot_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One stage in this (fresh) process; its figures as a dict."""
    import importlib

    steps = {}
    for name in STAGE_IMPORTS:
        importlib.import_module(name)
        steps[name] = status_mb("VmRSS")  # cumulative: what each import adds
    if stage == "import":
        return {"rss_mb": status_mb("VmRSS"), "file_mb": status_mb("RssFile"), "steps": steps}
    from adaptflow.compare import train_strategy
    from adaptflow.contracts import BaselineResult, Snapshot
    from adaptflow.cpus import configure_threads
    from adaptflow.data.images import ImageStore
    from adaptflow.training.baseline import baseline_for

    configure_threads()
    settings = settings_for(work, args)
    snapshot = Snapshot.load(snapshot_dir)
    start_mb = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here, on CUDA too (the stage resets CPU only)
    if stage == "baseline":
        candidate = baseline_for(snapshot, settings, work / "baseline").candidate
    else:
        baseline = BaselineResult.load(work / "baseline")
        candidate = train_strategy(
            "full", snapshot, baseline, work / "baseline" / "candidate", settings, work / "full", ImageStore()
        )
    return {
        "recorded_mb": candidate.cost.peak_memory_mb,
        "hwm_mb": status_mb("VmHWM"),
        "start_mb": start_mb,
        "file_mb": status_mb("RssFile"),  # mapped files (library code) stay resident: at the peak too
        "device": candidate.cost.device,
        "batch_size": int(candidate.extra.get("batch_size", 0)),
    }


def run_child(stage: str, work: Path, snapshot_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    flags = ["--size", str(args.size), "--epochs", str(args.epochs), "--device", args.device]
    command = [
        sys.executable,
        __file__,
        "--child",
        stage,
        "--workdir",
        str(work),
        "--snapshot",
        str(snapshot_dir),
    ]
    out = subprocess.run([*command, *flags], capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def activation_bytes(backbone: str, classes: int, size: int, batch: int) -> int:
    """Bytes autograd keeps for backward in one training step (each storage once)."""
    import torch

    from adaptflow.models.factory import build_model

    model = build_model(backbone, classes).train()
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # convolutions save their weights too: the model column
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(batch, 3, size, size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long))
    saved.pop(x.untyped_storage().data_ptr(), None)  # the input is the batch column
    del loss
    return sum(saved.values())


def parts(snapshot: Any, settings: Any, stage: str, train_batch: int, cuda: bool) -> dict[str, float]:
    """The stage's parts in MB; on CUDA the model's parts live on the device, not in the RSS."""
    from adaptflow.models.factory import backbone_def, build_model

    model = build_model(settings.backbone.name, len(snapshot.class_names))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    images = len(snapshot.split("train")) + len(snapshot.split("val"))
    size, classes = settings.backbone.input_size, len(snapshot.class_names)
    largest = max(train_batch, settings.baseline.feature_batch_size if stage == "baseline" else 0)
    copies = 2 if stage == "baseline" else 1
    device = {
        "model": copies * (params + buffers) / MB,
        "grads + AdamW": 3 * params / MB,
        "batch": largest * 3 * size * size * 4 / MB,
        "activations": activation_bytes(settings.backbone.name, classes, size, train_batch) / MB,
    }
    decodes = importlib.util.find_spec("adaptflow.training.decoded") is not None
    host = {
        "features": images * backbone_def(settings.backbone.name).feature_dim * 4 / MB
        if stage == "baseline"
        else 0.0,
        "decoded images": images * 3 * size * size / MB if decodes else 0.0,
    }
    return {
        **({k: 0.0 for k in device} if cuda else device),
        **host,
        **({f"device {k}": v for k, v in device.items()} if cuda else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=40, help="demo images per class (5 target classes)")
    parser.add_argument("--size", type=int, default=32, help="image and input size, px")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", choices=("import", *STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--snapshot", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir, args.snapshot, args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        measure(args, args.workdir or Path(tmp))


def measure(args: argparse.Namespace, work: Path) -> None:
    from adaptflow.data.demo import write_demo_data
    from adaptflow.data.ingest import ingest

    settings = settings_for(work, args)
    data = write_demo_data(work / "data", size=args.size, limit_per_class=args.per_class)
    snapshot = ingest(str(data.target), settings.ingest)
    snapshot.save(work / "snapshot")
    figures: dict[str, list[dict[str, Any]]] = {name: [] for name in ("import", *STAGES)}
    for round_ in range(args.rounds):
        for stage in figures:
            figures[stage].append(run_child(stage, work / f"round-{round_}", work / "snapshot", args))
            print(f"round {round_ + 1}: {stage:8s} {json.dumps(figures[stage][-1])}", flush=True)
    section = report(figures, snapshot, settings, args)
    print(section)
    if not args.no_write:
        write_results(section, RESULTS, HEADING)


def report(
    figures: dict[str, list[dict[str, Any]]], snapshot: Any, settings: Any, args: argparse.Namespace
) -> str:
    """The results section: one row per stage, its peak against its parts."""
    from adaptflow.training.schedule import plan_schedule

    imported = statistics.median(f["rss_mb"] for f in figures["import"])
    planned = plan_schedule(len(snapshot.split("train")), settings.finetune).batch_size
    cuda = figures["baseline"][0]["device"].startswith("cuda")
    columns = ["model", "grads + AdamW", "batch", "activations", "features", "decoded images", "library code"]
    imported_files = statistics.median(f["file_mb"] for f in figures["import"])
    rows, device_rows = [], []
    for stage in STAGES:
        runs = figures[stage]
        peak = statistics.median(f["hwm_mb"] for f in runs)
        batch = runs[0]["batch_size"] or planned
        part = parts(snapshot, settings, stage, batch, cuda)
        part["library code"] = statistics.median(f["file_mb"] for f in runs) - imported_files
        unexplained = peak - imported - sum(part[c] for c in columns)
        spread = ", ".join(f"{f['hwm_mb']:.0f}" for f in runs)
        cells = " | ".join(f"{part[c]:.1f}" for c in columns)
        rows.append(f"| {stage} | {peak:.0f} ({spread}) | {imported:.0f} | {cells} | {unexplained:.0f} |")
        if cuda:
            allocated = statistics.median(f["recorded_mb"] for f in runs)
            on_device = [part[f"device {c}"] for c in columns[:4]]
            device_rows.append(
                f"| {stage} | {allocated:.0f} | {' | '.join(f'{v:.1f}' for v in on_device)} | "
                f"{allocated - sum(on_device):.0f} |"
            )
    command = ("python bench/memory.py " + " ".join(sys.argv[1:])).strip()
    counts = {split: len(snapshot.split(split)) for split in ("train", "val", "test")}
    lines = [
        *provenance(HEADING, command),
        f"- setup: {settings.backbone.name} (random init), {args.size} px, demo digits `target` tree, "
        f"{args.per_class} images per class ({counts}); baseline_for, then train_strategy('full', "
        f"{args.epochs} epochs, batch {batch}); each stage in a fresh process, fresh workdir per round; "
        f"median of {args.rounds} rounds; device: {figures['baseline'][0]['device']}",
        "- import baseline, cumulative RSS after each import: "
        + ", ".join(f"{name} {mb:.0f} MB" for name, mb in figures["import"][0]["steps"].items()),
        f"- RSS at stage start (after imports, settings, snapshot): baseline "
        f"{statistics.median(f['start_mb'] for f in figures['baseline']):.0f} MB, finetune "
        f"{statistics.median(f['start_mb'] for f in figures['finetune']):.0f} MB",
        "",
        "MB. Peak RSS: VmHWM from the stage's start, as the stage records it on CPU (rounds in brackets); "
        "parts computed (module docstring).",
        "",
        "| stage | peak RSS | import baseline | model | grads + AdamW | batch | activations | features "
        "| decoded images | library code | unexplained |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if cuda:
        lines += [
            "",
            "CUDA, MB: `torch.cuda.max_memory_allocated` as the stage records it, against the parts on the device.",
            "",
            "| stage | peak allocated | model | grads + AdamW | batch | activations | unexplained |",
            "|---|---|---|---|---|---|---|",
            *device_rows,
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
