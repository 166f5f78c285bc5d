"""Inference: onnxruntime against PyTorch eager at batch 1 and 32, and `adaptflow predict` on image files.

Each model is built as adaptflow builds it (``build_model``, randomly initialised: the weights do not
change the work), saved as a candidate, exported by adaptflow's exporter (``export_onnx``, which also
checks parity) and loaded by ``load_onnx_classifier``. torch and onnxruntime get the same number of
intra-op threads (``--threads``, default: adaptflow's CPU budget).

- Latency: one batch of random input, ``model.eval()`` under ``torch.inference_mode()`` against the
  ONNX session, ``--calls`` calls per side per round (default: about half a second's worth), the two
  sides interleaved round after round (the order alternating, a pause before each so the other
  side's spinning threads are idle); median ms per batch over ``--rounds``.
  Ratio = onnxruntime ÷ eager; the goal (issue 12) is 0.7 or less.
- Predict: ``--files`` PNGs written by the demo data generator at the model's input size, classified
  end to end (read, decode, preprocess, model) by ``predict_files`` (decoding threads ahead of
  onnxruntime), by ``predict_files(workers=0)`` (everything in one thread, as before), and by the plain
  PyTorch loop a user would write (decode, ``eval_transform``, eager model, batches of 64). The split
  times decode + preprocess alone and onnxruntime alone on the same files.

Usage: ``python bench/inference.py [--models demo,resnet18-224] [--predict-models demo] [--rounds 5]
[--files 1000] [--threads N] [--no-write]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from evidence import provenance, publish

from adaptflow.onnx_model import OnnxClassifier

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Inference: onnxruntime against PyTorch eager (issue 12)"
GOAL = 0.7
PREDICT_BATCH = 64  # predict_files' default batch, used by the plain loop too
SETTLE_SECONDS = 0.5


@dataclass(frozen=True)
class Setup:
    backbone: str
    input_size: int
    classes: int


# "demo": what `make demo` trains (adaptflow.demo: resnet18 on 32-px digits, 5 target classes)
SETUPS = {"demo": Setup("resnet18", 32, 5), "resnet18-224": Setup("resnet18", 224, 5)}


def label(setup: Setup) -> str:
    return f"{setup.backbone}, {setup.input_size} px, {setup.classes} classes"


def exported(setup: Setup, work: Path, threads: int) -> tuple[torch.nn.Module, OnnxClassifier]:
    """(eager model in eval mode, onnxruntime classifier), both through adaptflow's own code."""
    from adaptflow.config import BackboneSpec, ExportConfig
    from adaptflow.contracts import Candidate, CostFigures, Preprocessing
    from adaptflow.export import export_onnx
    from adaptflow.models.factory import build_model
    from adaptflow.onnx_model import load_onnx_classifier
    from adaptflow.training.candidates import load_candidate, save_candidate

    torch.manual_seed(0)
    size = setup.input_size
    candidate = Candidate(
        name=f"bench-{setup.backbone}-{size}",
        strategy="transfer",
        backbone=BackboneSpec(name=setup.backbone, input_size=size),
        backbone_sha256="0" * 64,
        class_names=tuple(f"c{i}" for i in range(setup.classes)),
        preprocessing=Preprocessing(
            input_size=size, resize_size=size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
        ),
        metrics={},
        cost=CostFigures(wall_seconds=0.0, trainable_params=0, total_params=0),
    )
    folder = work / f"{setup.backbone}-{size}"
    save_candidate(candidate, build_model(setup.backbone, setup.classes), folder / "candidate")
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every step
        result = export_onnx(folder / "candidate", ExportConfig(latency_runs=1), folder / "onnx")
    _, model = load_candidate(folder / "candidate")  # what export compared against: eval mode
    runner = load_onnx_classifier(folder / "onnx" / "model.onnx", threads=threads)
    print(f"{label(setup)}: exported, max |ort - torch| = {result.max_abs_diff:.1e}", flush=True)
    return model.eval(), runner


def time_calls(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call, over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def warm_ms(fn: Callable[[], object], calls: int) -> float:
    """Milliseconds per call after one untimed call (it wakes this side's thread pool)."""
    fn()
    return time_calls(fn, calls) * 1e3


def interleaved(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each side once per round, the order reversed every other round so drift hits both alike.

    Before each side, a pause: torch's OpenMP threads and onnxruntime's pool spin for a while after
    their last call, and on a small machine the other side's spinning threads would take its cores.
    """
    figures: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            time.sleep(SETTLE_SECONDS)
            figures[name].append(sides[name]())
    return figures


def latency(
    model: torch.nn.Module, runner: OnnxClassifier, setup: Setup, batch: int, args: argparse.Namespace
) -> dict:
    x = torch.randn(batch, 3, setup.input_size, setup.input_size, generator=torch.Generator().manual_seed(0))
    array = x.numpy()

    def eager() -> None:
        with torch.inference_mode():
            model(x)

    def ort() -> None:
        runner.logits(array)

    eager()  # warm-up: first calls allocate and plan
    ort()
    calls = args.calls or max(3, math.ceil(0.5 / time_calls(eager, 1)))  # ~0.5 s of eager per round
    ms = interleaved(
        {"eager": lambda: warm_ms(eager, calls), "ort": lambda: warm_ms(ort, calls)},
        args.rounds,
    )
    return {"batch": batch, "calls": calls, **ms}


def demo_files(setup: Setup, count: int, work: Path) -> list[Path]:
    """``count`` PNGs from the demo generator at the model's size (20 trees of digits, taken in order)."""
    from adaptflow.data.demo import write_demo_data
    from adaptflow.predict import expand_paths

    root = work / f"files-{setup.input_size}"
    write_demo_data(root, size=setup.input_size, limit_per_class=math.ceil(count / 20))
    files = expand_paths([str(root)])[:count]
    if len(files) < count:
        raise SystemExit(f"the demo generator gives {len(files)} files, fewer than --files {count}")
    return files


def predict(
    model: torch.nn.Module, runner: OnnxClassifier, setup: Setup, files: list[Path], rounds: int
) -> dict:
    from adaptflow.data.images import decode_image, eval_transform
    from adaptflow.predict import predict_files

    pre = runner.preprocessing
    transform = eval_transform(pre)

    def prepared() -> list[torch.Tensor]:
        return [transform(decode_image(f.read_bytes(), resize_size=pre.resize_size)) for f in files]

    tensors = torch.stack(prepared()).numpy()

    def plain_pytorch() -> None:
        for i in range(0, len(files), PREDICT_BATCH):
            chunk = files[i : i + PREDICT_BATCH]
            batch = torch.stack(
                [transform(decode_image(f.read_bytes(), resize_size=pre.resize_size)) for f in chunk]
            )
            with torch.inference_mode():
                model(batch).softmax(1)

    def ort_only() -> None:
        for i in range(0, len(tensors), PREDICT_BATCH):
            runner.logits(tensors[i : i + PREDICT_BATCH])

    sides: dict[str, Callable[[], object]] = {
        "plain PyTorch loop (eager)": plain_pytorch,
        "adaptflow predict, workers=0": lambda: predict_files(runner, files, workers=0),
        "adaptflow predict": lambda: predict_files(runner, files),
        "decode + preprocess only": prepared,
        "onnxruntime only": ort_only,
    }
    predict_files(runner, files[:PREDICT_BATCH])  # warm-up: the pool, the session's buffers
    timed: dict[str, Callable[[], float]] = {name: partial(time_calls, fn, 1) for name, fn in sides.items()}
    return interleaved(timed, rounds)


def latency_rows(name: str, setup: Setup, rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        eager, ort = statistics.median(row["eager"]), statistics.median(row["ort"])
        ratio = ort / eager
        spread = " / ".join(", ".join(f"{v:.2f}" for v in row[side]) for side in ("eager", "ort"))
        lines.append(
            f"| {name} ({label(setup)}) | {row['batch']} | {eager:.2f} | {ort:.2f} | **{ratio:.2f}** "
            f"{'(met)' if ratio <= GOAL else '(missed)'} | {row['batch'] * 1e3 / eager:.0f} | "
            f"{row['batch'] * 1e3 / ort:.0f} | {row['calls']} | {spread} |"
        )
    return lines


def predict_rows(name: str, files: int, seconds: dict[str, list[float]]) -> list[str]:
    rate = {side: files / statistics.median(values) for side, values in seconds.items()}
    plain = rate["plain PyTorch loop (eager)"]
    lines = []
    for side in list(seconds)[:3]:
        spread = ", ".join(f"{files / s:.0f}" for s in seconds[side])
        lines.append(f"| {name} | {side} | {rate[side]:.0f} | {rate[side] / plain:.2f} | {spread} |")
    decode = statistics.median(seconds["decode + preprocess only"])
    ort = statistics.median(seconds["onnxruntime only"])
    lines.append(
        f"| {name} | split: decode + preprocess {decode:.2f} s ({decode / (decode + ort):.0%}), "
        f"onnxruntime {ort:.2f} s ({ort / (decode + ort):.0%}) | | | |"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="demo,resnet18-224", help=f"of {', '.join(SETUPS)}")
    parser.add_argument("--predict-models", default="demo", help="models to run predict with (or none)")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--calls", type=int, default=0, help="calls per side per round; 0: ~0.5 s of eager, at least 3"
    )
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="torch and onnxruntime threads; 0: CPU budget")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from adaptflow.cpus import configure_threads, cpu_budget

    threads = configure_threads(args.threads or None)
    models = [m for m in args.models.split(",") if m]
    predicting = [m for m in args.predict_models.split(",") if m and m != "none"]
    unknown = set(models + predicting) - set(SETUPS)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; known: {', '.join(SETUPS)}")
    lat: list[str] = []
    pred: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        for name in dict.fromkeys(models + predicting):
            setup = SETUPS[name]
            model, runner = exported(setup, work, threads)
            ort_threads = runner.session.get_session_options().intra_op_num_threads
            assert torch.get_num_threads() == ort_threads == threads, (torch.get_num_threads(), ort_threads)
            if name in models:
                rows = [latency(model, runner, setup, int(b), args) for b in args.batches.split(",")]
                lat += latency_rows(name, setup, rows)
                print("\n".join(lat[-len(rows) :]), flush=True)
            if name in predicting:
                files = demo_files(setup, args.files, work)
                pred += predict_rows(
                    f"{name} ({label(setup)})", len(files), predict(model, runner, setup, files, args.rounds)
                )
                print("\n".join(pred[-4:]), flush=True)
    command = ("python bench/inference.py " + " ".join(sys.argv[1:])).strip()
    lines = [
        *provenance(HEADING, command),
        f"- setup: adaptflow's build_model (random init), exported by adaptflow.export (opset 18, dynamo), "
        f"loaded by load_onnx_classifier; {threads} intra-op thread(s) for torch and onnxruntime alike "
        f"(CPU budget here: {cpu_budget()}); sides interleaved, median of {args.rounds} rounds",
        "",
        f"Latency per batch (eager: `model.eval()` under `torch.inference_mode()`); goal: ratio ≤ {GOAL}.",
        "",
        "| model | batch | eager ms | onnxruntime ms | ratio ORT ÷ eager | eager img/s | ORT img/s | calls/round "
        "| rounds, ms (eager / ORT) |",
        "|---|---|---|---|---|---|---|---|---|",
        *lat,
    ]
    if pred:
        lines += [
            "",
            f"Predict end to end (read + decode + preprocess + model) on {args.files} demo PNGs, batches of "
            f"{PREDICT_BATCH}; `adaptflow predict` decodes in {threads} thread(s) ahead of onnxruntime.",
            "",
            "| model | path | images/s (median) | ratio to plain PyTorch | rounds, images/s |",
            "|---|---|---|---|---|",
            *pred,
        ]
    publish(lines, HEADING, write=not args.no_write, path=RESULTS)


if __name__ == "__main__":
    main()
