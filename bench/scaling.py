"""What the scaling modes of issue 14 cost on this machine: DDP on CPU, and shards streamed from S3.

Data: Fashion-MNIST training images (Debian's ``dataset-fashion-mnist``, all 10 classes) written
as PNG files and ingested by adaptflow; 32 px (28-px images resized), like bench/finetune.py.

1. **DDP on CPU (gloo).** The finetune stage's own code path: its worker entry point
   (``adaptflow.training.finetune_worker``), started by ``launch_on_this_node`` as the finetune
   component starts it, with 1 process (torch threads = the CPU budget) against 2 processes
   (gloo, the budget split between them), at the same global batch. ResNet-18, ``full`` strategy,
   default augmentation; the baseline stage is skipped: fine-tuning starts from a freshly initialised
   network saved as the baseline candidate (throughput does not depend on the weights' values).
   images/s = the images of one epoch ÷ its seconds, both from the candidate's history (rank 0's
   clock; an epoch's seconds include its validation pass over the val split), median of epochs 2..E
   (epoch 1 is warm-up). The whole-run ``cost.train_images_per_second`` (warm-up included) is shown
   beside it. On 2 CPUs this measures DDP's overhead (gradient all-reduce, sampler, buffer
   broadcast), not a speedup: both sides have the same 2 cores.
2. **Shards from object storage.** The images are uploaded to a moto S3 server (``moto_server`` on a
   free port; adaptflow reaches it through ``ADAPTFLOW_S3_ENDPOINT_URL``) and ingested from there.
   The train split is written once as WebDataset shards (``write_shards``; its one-off cost is
   reported), then read by ``shard_loader`` with 2 DataLoader workers and no model: epoch 1 (cold:
   streaming + decoding) and epoch 2 (cache warm as far as its limit allows), with the decoded-shard
   cache limited to half the split's decoded size, and with room for all of it. Against the decoded
   ``uint8`` path fine-tuning uses by default (``decode_split`` reading each image from S3, then
   ``finetune_train_loader`` with the same 2 workers): its epoch 1 includes the decode.
   moto runs on the same CPUs, so its serving cost is in these figures (a real store's latency is not).

Sides are interleaved (order reversed every other round); each figure is the median of ``--rounds``.

    python bench/scaling.py [--images 3000] [--rounds 3] [--epochs 3] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evidence import provenance, publish
from fashion_mnist import draw, find_dataset_dir, load_split, write_tree

DDP_HEADING = "## Scaling: DDP fine-tuning on CPU (issue 14)"
SHARDS_HEADING = "## Scaling: training input from shards on S3 (issue 14)"
SIZE = 32
BATCH = 64
LOADER_WORKERS = 2
BUCKET = "scaling"


def preprocessing() -> Any:
    from adaptflow.contracts import Preprocessing

    return Preprocessing(input_size=SIZE, resize_size=SIZE, mean=(0.29,) * 3, std=(0.35,) * 3)


def fashion_tree(root: Path, images: int) -> Path:
    x, y = load_split(find_dataset_dir(), "train")
    return write_tree(root / f"fmnist-{images}", x, y, draw(y, images // 10, 0, tuple(range(10))), "train")


def ingest_config() -> Any:
    from adaptflow.config import IngestConfig

    # a small val split: its pass is part of every DDP epoch's seconds; the test split is unused
    return IngestConfig(val_fraction=0.05, test_fraction=0.02)


# --------------------------------------------------------------------------- 1. DDP on CPU


@dataclass(frozen=True)
class DdpCase:
    work: Path
    worker_args: list[str]  # the finetune worker's arguments, less --out-dir
    train_images: int


@dataclass(frozen=True)
class DdpRun:
    steady: float  # median images/s of epochs 2..E
    whole: float  # cost.train_images_per_second (every epoch)
    batch: int  # the global batch the schedule planned


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    """Prints how long a setup phase took (what the defaults' runtime is made of)."""
    start = time.perf_counter()
    yield
    print(f"{what}: {time.perf_counter() - start:.1f} s", flush=True)


def fresh_baseline(snapshot: Any, out: Path) -> None:
    """A baseline result whose candidate is a freshly initialised ResNet-18: fine-tuning's starting point
    without running the baseline stage."""
    import torch

    from adaptflow.config import BackboneSpec
    from adaptflow.contracts import BaselineResult, Candidate, CostFigures, FinetuneDecision
    from adaptflow.models.factory import build_model, count_parameters
    from adaptflow.training.candidates import save_candidate

    torch.manual_seed(0)
    model = build_model("resnet18", len(snapshot.class_names))
    trainable, total = count_parameters(model)
    candidate = Candidate(
        name="baseline",
        strategy="baseline",
        backbone=BackboneSpec(name="resnet18", weights="none"),
        backbone_sha256="0" * 64,
        class_names=tuple(snapshot.class_names),
        preprocessing=preprocessing(),
        metrics={"train_accuracy": 0.0, "val_accuracy": 0.0, "val_loss": 0.0},
        cost=CostFigures(wall_seconds=0.0, trainable_params=trainable, total_params=total),
    )
    decision = FinetuneDecision(
        should_finetune=True, strategy="full", reason="bench: baseline skipped", signals={}
    )
    save_candidate(candidate, model, out / "candidate")
    BaselineResult(candidate=candidate, decision=decision).save(out)


def ddp_case(tree: Path, work: Path, epochs: int) -> DdpCase:
    from mlflow.tracking import MlflowClient

    from adaptflow.config import load_settings
    from adaptflow.data.ingest import ingest
    from adaptflow.tracking import ensure_experiment

    settings = load_settings(
        overrides=[
            f"workdir={work}",
            f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
            f"finetune.epochs={epochs}",
            f"finetune.patience={epochs}",  # no early stop: every run trains every epoch
            "finetune.strategy=full",
            "finetune.device=cpu",
            "baseline.advisor.choose_strategy=false",
        ]
    )
    with timed(f"ddp: ingest {tree.name}"):
        snapshot = ingest(str(tree), ingest_config())
    snapshot.save(work / "snapshot")
    fresh_baseline(snapshot, work / "baseline")
    config = work / "config.json"
    config.write_text(settings.to_json())
    client = MlflowClient(settings.tracking.tracking_uri)
    experiment = ensure_experiment(settings.tracking.tracking_uri, "scaling", work)  # artifacts under work
    parent = client.create_run(experiment, run_name="bench").info.run_id
    args = ["--snapshot-dir", str(work / "snapshot"), "--baseline-dir", str(work / "baseline")]
    args += ["--config-json-file", str(config), "--parent-run-id", parent]
    args += ["--fingerprint", snapshot.fingerprint]
    return DdpCase(work, args, len(snapshot.split("train")))


def ddp_run(case: DdpCase, processes: int, out: Path) -> DdpRun:
    """One fine-tuning run through the worker entry point; its throughput read from the candidate."""
    from adaptflow.contracts import Candidate
    from adaptflow.training.distributed import launch_on_this_node

    launch_on_this_node(processes, [*case.worker_args, "--out-dir", str(out)])
    candidate = Candidate.load(out)
    history, whole = candidate.history, candidate.cost.train_images_per_second
    if len(history) < 2 or not whole:
        raise SystemExit(f"error: {len(history)} epoch(s) recorded\nhint: use --epochs 2 or more")
    # the loop's own (all-rank) image count: every epoch trains the same number of images
    per_epoch = whole * sum(r.seconds for r in history) / len(history)
    shutil.rmtree(out.parent, ignore_errors=True)  # this run's candidate and checkpoint folder
    steady = statistics.median(per_epoch / r.seconds for r in history[1:])
    return DdpRun(steady, whole, int(candidate.extra["batch_size"]))


def bench_ddp(args: argparse.Namespace, tree: Path, work: Path) -> list[str]:
    from adaptflow.cpus import cpu_budget

    cpus = cpu_budget().cpus
    case = ddp_case(tree, work, args.epochs)
    sides = {1: f"1 process, {cpus} threads", 2: f"2 processes (gloo), {max(1, cpus // 2)} thread(s) each"}
    runs: dict[int, list[DdpRun]] = {n: [] for n in sides}
    for round_ in range(args.rounds):
        for n in sides if round_ % 2 == 0 else reversed(list(sides)):
            runs[n].append(ddp_run(case, n, work / f"run-{round_}-{n}" / "candidate"))
            print(f"ddp round {round_ + 1}: {sides[n]:34s} {runs[n][-1].steady:7.1f} img/s", flush=True)
    steady = {n: statistics.median(r.steady for r in rs) for n, rs in runs.items()}
    rows = [
        f"| {sides[n]} | {steady[n]:.1f} | {', '.join(f'{r.steady:.0f}' for r in runs[n])} "
        f"| {statistics.median(r.whole for r in runs[n]):.1f} |"
        for n in sides
    ]
    return [
        f"- setup: ResNet-18 (`full`, fresh weights, augmentation on), {SIZE} px, {case.train_images} "
        f"training images, global batch {runs[1][0].batch} (each of 2 ranks takes half), {args.epochs} epochs per "
        f"run, median of {args.rounds} interleaved rounds; CPU budget {cpus}",
        "- images/s: from the candidate's history (rank 0's epoch seconds, validation pass included), "
        "median of epochs 2.. (epoch 1 is warm-up); whole run: its `cost.train_images_per_second`",
        f"- **2 processes ÷ 1 process: {steady[2] / steady[1]:.2f}**. On {cpus} CPUs both sides have "
        "the same cores, so this is DDP's overhead (gradient all-reduce, DistributedSampler, buffer "
        "broadcast, one thread per rank), not a speedup; DDP pays where each rank has its own device.",
        "",
        "| side | images/s, steady (median) | rounds | images/s, whole run (median) |",
        "|---|---|---|---|",
        *rows,
    ]


# --------------------------------------------------------------------------- 2. shards on S3


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """``moto_server`` on a free loopback port, with adaptflow's and boto3's env pointing at it."""
    from adaptflow.storage import S3_ENDPOINT_ENV, s3_client

    port = free_port()
    command = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    server = subprocess.Popen(
        [command, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        S3_ENDPOINT_ENV: endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in env}
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"error: moto_server did not start on port {port}\nhint: pip install 'moto[server]'"
                )
            time.sleep(0.2)
        os.environ.update(env)  # inherited by the DataLoader workers
        s3_client.cache_clear()
        yield endpoint
    finally:
        server.terminate()
        server.wait(10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3_client.cache_clear()


def upload_tree(tree: Path, prefix: str) -> str:
    from adaptflow.storage import s3_client

    client = s3_client()
    client.create_bucket(Bucket=BUCKET)
    files = sorted(tree.glob("*/*.png"))
    with ThreadPoolExecutor(8) as pool:  # uploads wait on the server, not the CPU
        list(
            pool.map(
                lambda p: client.upload_file(str(p), BUCKET, f"{prefix}/{p.parent.name}/{p.name}"), files
            )
        )
    return f"s3://{BUCKET}/{prefix}"


def count_epoch(loader: Any) -> tuple[int, float]:
    start = time.perf_counter()
    images = sum(len(labels) for _, labels in loader)
    return images, time.perf_counter() - start


def shard_epochs(shard_set: Any, cache_dir: Path, limit: int) -> tuple[list[float], str]:
    """Two epochs of the shard loader from an empty cache: images/s each, and what the cache did."""
    from adaptflow.training.shard_loader import ShardCache, shard_loader

    loader = shard_loader(
        shard_set, preprocessing(), cache_dir, limit, batch_size=BATCH, seed=0, num_workers=LOADER_WORKERS
    )
    rates = []
    for _ in range(2):
        images, seconds = count_epoch(loader)
        rates.append(images / seconds)
    stats = ShardCache(cache_dir, limit).stats()
    counts = {what: sum(stats.get(what, {}).values()) for what in ("streamed", "hits", "evictions")}
    return rates, ", ".join(f"{n} {what}" for what, n in counts.items())


def decoded_epochs(entries: list[Any], classes: tuple[str, ...], cache_dir: Path) -> tuple[list[float], str]:
    """The decoded path from an empty cache: epoch 1 = decode (each image read from S3) + one epoch."""
    from adaptflow.config import FinetuneConfig
    from adaptflow.data.images import ImageStore
    from adaptflow.training.batches import finetune_train_loader
    from adaptflow.training.decoded import decode_split

    start = time.perf_counter()
    decoded = decode_split(entries, classes, preprocessing(), ImageStore(), cache_dir)
    decode_seconds = time.perf_counter() - start
    loader = finetune_train_loader(decoded, FinetuneConfig(num_workers=LOADER_WORKERS), BATCH, seed=0)
    rates = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        images, seconds = count_epoch(loader)
        rates.append(images / (seconds + (decode_seconds if epoch == 0 else 0.0)))
    return rates, f"decode {decode_seconds:.1f} s"


def bench_shards(args: argparse.Namespace, tree: Path, work: Path) -> list[str]:
    from adaptflow.data.ingest import ingest
    from adaptflow.data.shards import write_shards

    with moto_server():
        with timed("shards: upload to moto"):
            uri = upload_tree(tree, "fmnist")
        with timed("shards: ingest from S3"):
            snapshot = ingest(uri, ingest_config())
        entries = snapshot.split("train")
        start = time.perf_counter()
        shard_set = write_shards(
            snapshot, "train", f"s3://{BUCKET}/root", shard_images=math.ceil(len(entries) / args.shards)
        )
        write_seconds = time.perf_counter() - start
        decoded_bytes = shard_set.samples * (3 * SIZE * SIZE + 8)  # pixels + int64 label
        limits = {"half": decoded_bytes // 2, "all": 2 * decoded_bytes + len(shard_set.shards) * 8192}
        sides: dict[str, Callable[[Path], tuple[list[float], str]]] = {
            f"shards, cache {limits['half'] / 1e6:.1f} MB (½ of decoded)": lambda d: shard_epochs(
                shard_set, d, limits["half"]
            ),
            f"shards, cache {limits['all'] / 1e6:.1f} MB (all fits)": lambda d: shard_epochs(
                shard_set, d, limits["all"]
            ),
            "decoded uint8 cache (per-image reads)": lambda d: decoded_epochs(
                entries, tuple(snapshot.class_names), d
            ),
        }
        rates: dict[str, list[list[float]]] = {name: [] for name in sides}
        notes: dict[str, str] = {}  # what the cache did in the side's last run
        for round_ in range(args.rounds):
            for name in sides if round_ % 2 == 0 else reversed(list(sides)):
                epoch_rates, notes[name] = sides[name](Path(tempfile.mkdtemp(dir=work, prefix="cache-")))
                rates[name].append(epoch_rates)
                shown = " / ".join(f"{r:7.0f}" for r in epoch_rates)
                print(f"shards round {round_ + 1}: {name:44s} {shown} img/s", flush=True)
    rows = [
        f"| {name} | {statistics.median(r[0] for r in rs):.0f} | {statistics.median(r[1] for r in rs):.0f} "
        f"| {', '.join(f'{r[0]:.0f}/{r[1]:.0f}' for r in rs)} | {notes[name]} |"
        for name, rs in rates.items()
    ]
    return [
        f"- setup: {shard_set.samples} training images ({SIZE} px decoded: {decoded_bytes / 1e6:.1f} MB), "
        f"moto S3 on loopback, batch {BATCH}, {LOADER_WORKERS} DataLoader workers, no model; median of "
        f"{args.rounds} interleaved rounds, each side from an empty cache",
        f"- shard step (one-off, per fingerprint): {len(shard_set.shards)} shards, "
        f"{shard_set.bytes / 1e6:.1f} MB written to S3 in {write_seconds:.1f} s",
        "- epoch 1 (cold): shards streamed and decoded; decoded path: `decode_split` (one GET per image) "
        "+ the epoch. Epoch 2: shards from the cache where it kept them (evicted ones streamed again)",
        "",
        "| input | epoch 1 images/s | epoch 2 images/s | rounds (epoch 1/epoch 2) | cache (last round) |",
        "|---|---|---|---|---|",
        *rows,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=3000, help="Fashion-MNIST images drawn (10 classes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="per DDP run; the first is warm-up")
    parser.add_argument("--shards", type=int, default=16, help="shards the train split is cut into")
    parser.add_argument("--only", choices=("ddp", "shards"), default=None, help="run one measurement")
    parser.add_argument("--no-write", action="store_true", help="print, leave bench/RESULTS.md alone")
    args = parser.parse_args()
    command = ("python bench/scaling.py " + " ".join(sys.argv[1:])).strip()
    started = time.perf_counter()
    # other work on the machine skews every figure here (spinning torch threads: DESIGN.md, "Fit the pod")
    idle = " / ".join(f"{value:.2f}" for value in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="adaptflow-scaling-") as tmp:
        work = Path(tmp)
        with timed(f"write {args.images} Fashion-MNIST PNGs"):
            tree = fashion_tree(work, args.images)
        benches = {"ddp": (DDP_HEADING, bench_ddp), "shards": (SHARDS_HEADING, bench_shards)}
        for name, (heading, bench) in benches.items():
            if args.only in (None, name):
                (work / name).mkdir()
                lines = bench(args, tree, work / name)
                load = f"- load average before the bench started (1/5/15 min): {idle}"
                publish([*provenance(heading, command), load, *lines], heading, write=not args.no_write)
    print(f"total wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
