"""Fine-tuning throughput: adaptflow's loop against a plain PyTorch loop, and the real data path
against synthetic batches.

Data: Fashion-MNIST training images (Debian's ``dataset-fashion-mnist``) written as PNG files and
ingested by adaptflow, resized to ``--sizes`` px. Every side trains the same torchvision model,
batch size, AdamW and loss, in this one process with the same torch threads:

- ``adaptflow``: :func:`adaptflow.training.loop.fit`, fed as fine-tuning feeds it: the decoded
  ``uint8`` cache (training/decoded.py), its loader and the batch transform on the device
  (augmentation, scaling, normalisation; training/batches.py). ``--amp``/channels_last as configured.
- ``plain``: the loop a user writes: ``for x, y in loader: zero_grad; loss(model(x), y).backward();
  step``, over the same decoded images, applying the same batch transform, fp32, no checks.
- ``synthetic``: the same ``fit`` fed pre-made normalised tensors (no loader, no transform): what
  the model alone can do. adaptflow ÷ synthetic is the data path's cost.

Steady state: each side runs ``--epochs`` epochs per round; the first is warm-up and the median of
the rest is that round's images/s (training images ÷ epoch seconds, each epoch with a validation
pass over the same 64 images on every side). The median of ``--rounds`` interleaved rounds is reported.

On CUDA (``--gpu``): ResNet-50 at 224 px, adaptflow with bf16 autocast and channels_last against
the plain fp32 loop; utilisation = achieved FLOP/s (counted by ``torch.utils.flop_counter`` on one
training step) ÷ the card's dense bf16 peak.

Usage: ``python bench/finetune.py [--rounds 5] [--sizes 32,224] [--gpu] [--no-write]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from evidence import provenance, publish
from fashion_mnist import draw, find_dataset_dir, load_split, write_tree
from torch import nn

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Fine-tuning throughput against plain PyTorch (issue 12)"
#: dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets
DENSE_BF16_PEAK = {"H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(name: str) -> float | None:
    for key, value in DENSE_BF16_PEAK.items():
        if all(part in name for part in key.split()):
            return value
    return 989.0 if "H100" in name else None  # an unnamed H100 variant: the SXM figure


def dataset(root: Path, images: int) -> tuple[list, tuple[str, ...]]:
    from adaptflow.config import IngestConfig
    from adaptflow.data.ingest import ingest

    x, y = load_split(find_dataset_dir(), "train")
    tree = write_tree(root / f"fmnist-{images}", x, y, draw(y, images // 10, 0, tuple(range(10))), "train")
    snapshot = ingest(str(tree), IngestConfig(val_fraction=0.01, test_fraction=0.01))
    return snapshot.split("train"), snapshot.class_names


def make_model(arch: str, classes: int, device: torch.device, channels_last: bool) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=classes).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model  # type: ignore[call-overload]


def epoch_rates(seconds: list[float], images: int) -> float:
    return statistics.median(images / s for s in seconds[1:])  # the first epoch is warm-up


def run_fit(model: nn.Module, loader, val, device, amp: bool, cl: bool, transforms) -> float:  # type: ignore[no-untyped-def]
    from adaptflow.training.loop import fit

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    result = fit(
        model,
        loader,
        val,
        optimizer,
        epochs=EPOCHS,
        patience=EPOCHS,
        device=device,
        amp=amp,
        channels_last=cl,
        train_transform=transforms[0],
        val_transform=transforms[1],
        label="bench",
    )
    return epoch_rates([r.seconds for r in result.history], result.train_images // len(result.history))


def run_plain(model: nn.Module, loader, val, device: torch.device, transforms) -> float:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    transform, val_transform = transforms[0].to(device).train(), transforms[1].to(device)
    seconds, images = [], 0
    for _ in range(EPOCHS):
        start, images = time.perf_counter(), 0
        for x, y in loader:
            x, y = transform(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            images += len(y)
        model.eval()  # and a validation pass per epoch, as fit (and the tutorial) make one
        with torch.no_grad():
            sum(int((model(val_transform(x.to(device))).argmax(1) == y.to(device)).sum()) for x, y in val)
        model.train()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return epoch_rates(seconds, images)


def train_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        nn.functional.cross_entropy(model(x).float(), y).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


EPOCHS = 3


def bench_size(args: argparse.Namespace, size: int, entries: list, classes: tuple[str, ...]) -> list[str]:
    from adaptflow.contracts import Preprocessing
    from adaptflow.data.images import ImageStore
    from adaptflow.training.batches import decoded_loader, eval_batches, eval_loader, train_batches
    from adaptflow.training.decoded import decode_split

    device = torch.device("cuda" if args.gpu else "cpu")
    arch = "resnet50" if args.gpu else args.arch
    amp = cl = args.gpu  # adaptflow's defaults on CUDA: bf16 autocast and channels_last
    pre = Preprocessing(input_size=size, resize_size=size, mean=(0.29, 0.29, 0.29), std=(0.35, 0.35, 0.35))
    used = (
        entries
        if size <= 64 or args.gpu
        else entries[:: max(1, len(entries) // args.images_224)][: args.images_224]
    )
    images = decode_split(used, classes, pre, ImageStore())
    val = eval_loader(images.subset(slice(0, 64)))
    transforms = (train_batches(pre, augment=True), eval_batches(pre))
    loader = decoded_loader(images, batch_size=args.batch, shuffle=True, seed=0, drop_last=True)
    synthetic = [
        (
            torch.randn(args.batch, 3, size, size, device=device),
            torch.randint(0, len(classes), (args.batch,), device=device),
        )
        for _ in range(len(images) // args.batch)
    ]
    sides: dict[str, Callable[[], float]] = {
        "adaptflow": lambda: run_fit(
            make_model(arch, len(classes), device, cl), loader, val, device, amp, cl, transforms
        ),
        "plain": lambda: run_plain(
            make_model(arch, len(classes), device, False), loader, val, device, transforms
        ),
        "synthetic": lambda: run_fit(
            make_model(arch, len(classes), device, cl), synthetic, val, device, amp, cl, (None, transforms[1])
        ),
    }
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        for name in sides if round_ % 2 == 0 else reversed(list(sides)):
            rates[name].append(sides[name]())
            print(f"{size}px round {round_ + 1}: {name:10s} {rates[name][-1]:8.1f} img/s", flush=True)
    median = {name: statistics.median(r) for name, r in rates.items()}
    lines = [
        f"| {arch} | {size} px | {len(images)} | {name} | {median[name]:.1f} | "
        f"{', '.join(f'{r:.0f}' for r in rates[name])} | "
        + {
            "adaptflow": "–",
            "plain": f"{median['adaptflow'] / median['plain']:.2f}",
            "synthetic": f"{median['adaptflow'] / median['synthetic']:.2f}",
        }[name]
        + " |"
        for name in sides
    ]
    if args.gpu:
        x, y = synthetic[0]
        flops = train_flops(make_model(arch, len(classes), device, cl), x, y, amp)
        name = torch.cuda.get_device_name(0)
        peak = args.peak_tflops or peak_tflops(name)
        achieved = flops / args.batch * median["adaptflow"] / 1e12
        util = f"{achieved / peak:.1%} of {peak:g}" if peak else "peak unknown (--peak-tflops)"
        lines.append(
            f"\n- {name}: {flops / args.batch / 1e9:.1f} GFLOP per training image; adaptflow "
            f"{achieved:.1f} TFLOP/s = {util} dense bf16 TFLOP/s; peak GPU memory "
            f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB\n"
        )
    return lines


def main() -> None:
    global EPOCHS
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="per side and round; the first is warm-up")
    parser.add_argument("--sizes", default="32,224", help="image sizes in px (CPU)")
    parser.add_argument("--images", type=int, default=2000, help="training images")
    parser.add_argument(
        "--images-224", type=int, default=192, help="of those, used at sizes above 64 px on CPU"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--arch", default="resnet18", help="torchvision model on CPU (CUDA: resnet50)")
    parser.add_argument("--gpu", action="store_true", help="ResNet-50, 224 px, bf16 + channels_last on CUDA")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    EPOCHS = args.epochs
    from adaptflow.cpus import configure_threads

    configure_threads()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("error: --gpu needs a CUDA device\nhint: run it where `device status` lends one")
    sizes = [224] if args.gpu else [int(s) for s in args.sizes.split(",")]
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="adaptflow-bench-") as tmp:
        entries, classes = dataset(Path(tmp), args.images)
        for size in sizes:
            rows += bench_size(args, size, entries, classes)
    command = "python bench/finetune.py " + " ".join(sys.argv[1:])
    heading = HEADING + (" on CUDA" if args.gpu else "")
    lines = [
        *provenance(heading, command.strip()),
        f"- setup: batch {args.batch}, AdamW, {args.epochs} epochs per side and round (first = warm-up, "
        f"median of the rest), median of {args.rounds} interleaved rounds; torch threads {torch.get_num_threads()}",
        "- ratio column: adaptflow ÷ plain (goal ≥ 0.95 on CPU, ≥ 2 on CUDA with bf16 + channels_last "
        "against plain fp32) and adaptflow ÷ synthetic (the real data path; goal ≥ 0.8)",
        "",
        "| model | size | images | side | images/s (median) | rounds | ratio |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    publish(lines, heading, write=not args.no_write, path=RESULTS)


if __name__ == "__main__":
    main()
