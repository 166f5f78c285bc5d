"""Transfer learning versus fine-tuning on the split-task digits (Yosinski et al. 2014), measured.

Source digits 0-4 pretrain a resnet18 (``adaptflow.demo.prepare_demo``); the targets are digits 5-9
as they are (``target/``, in-domain) and inverted + rotated (``target-shifted/``). Each target is run
with all its training images and with a few per class (a deterministic subsample of the snapshot's
train split; val and test unchanged), and each condition compares: the frozen baseline (linear probe
on cached features), fine-tuning (``partial``, ``full``) and the from-scratch control (``scratch``).

    .venv/bin/python bench/evidence.py [--workdir .adaptflow] [--epochs 6] [--few 10] [--no-write]

Writes a Markdown table into bench/RESULTS.md under "Transfer vs fine-tuning evidence".
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HEADING = "## Transfer vs fine-tuning evidence"
STRATEGIES = ("partial", "full", "scratch")


@dataclass(frozen=True)
class Condition:
    dataset: str  # "target" or "target-shifted"
    train_per_class: int | None  # None: every training image


@dataclass(frozen=True)
class Row:
    condition: Condition
    strategy: str
    accuracy: float
    ci: tuple[float, float]
    macro_f1: float
    trainable_params: int
    wall_seconds: float
    train_val_gap: float
    advisor_finetune: bool
    advisor_reason: str
    domain_shift: float | None
    best: str


def overrides(workdir: Path, weights_uri: str, sha256: str, epochs: int) -> list[str]:
    return [
        f"workdir={workdir}",
        f"backbone.weights_uri={weights_uri}",
        f"backbone.sha256={sha256}",
        f"finetune.epochs={epochs}",
        f"finetune.patience={epochs}",
        "evaluate.bootstrap_samples=500",
    ]


def run_condition(
    condition: Condition,
    workdir: Path,
    strategies: tuple[str, ...] = STRATEGIES,
    epochs: int = 6,
) -> list[Row]:
    from adaptflow.compare import run_compare
    from adaptflow.config import load_settings
    from adaptflow.demo import prepare_demo

    assets = prepare_demo(workdir)
    settings = load_settings(overrides=overrides(workdir, assets.weights_uri, assets.sha256, epochs))
    name = f"{condition.dataset}-{condition.train_per_class or 'all'}"
    result = run_compare(
        str(assets.data / condition.dataset),
        settings,
        list(strategies),
        workdir / "evidence" / name,
        train_per_class=condition.train_per_class,
        track=False,
        report=False,
    )
    shift = result.decision.signals.get("domain_shift")
    return [
        Row(
            condition,
            o.strategy,
            o.score.accuracy,
            o.score.accuracy_ci95,
            o.score.macro_f1,
            o.trainable_params,
            o.wall_seconds,
            o.train_val_gap,
            result.decision.should_finetune,
            result.decision.reason,
            float(shift) if isinstance(shift, (int, float)) else None,
            result.best,
        )
        for o in result.outcomes
    ]


def markdown(rows: list[Row], command: str, seconds: float) -> str:
    import torch

    machine = (
        f"{platform.node() or 'unknown'}: {platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
        + (
            f"CUDA {torch.cuda.get_device_name(0)}"
            if torch.cuda.is_available()
            else f"CPU ({torch.get_num_threads()} threads)"
        )
    )
    lines = [
        HEADING,
        "",
        f"- machine: {machine}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- command: `{command}`",
        f"- total wall time: {seconds:.0f} s",
        "- data: scikit-learn digits at 32 px; source = digits 0-4 (pretrained resnet18), target = 5-9, "
        "shifted = 5-9 inverted and rotated 90°; test split identical across rows of a condition",
        "",
        "| target | train imgs/class | strategy | test accuracy [95% CI] | macro-F1 | trainable params | wall s | train-val gap | domain shift | advisor | best (margin rule) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r.condition
        lines.append(
            f"| {c.dataset} | {c.train_per_class or 'all'} | {r.strategy} | {r.accuracy:.3f} [{r.ci[0]:.3f}, {r.ci[1]:.3f}] "
            f"| {r.macro_f1:.3f} | {r.trainable_params:,} | {r.wall_seconds:.1f} | {r.train_val_gap:+.3f} "
            f"| {'-' if r.domain_shift is None else f'{r.domain_shift:.3f}'} "
            f"| {'fine-tune' if r.advisor_finetune else 'keep baseline'} | {r.best} |"
        )
    return "\n".join(lines) + "\n"


def write_results(section: str, path: Path) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section + "\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path(".adaptflow"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument(
        "--few", type=int, default=10, help="train images per class in the few-images condition"
    )
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    rows: list[Row] = []
    for dataset in ("target", "target-shifted"):
        for per_class in (None, args.few):
            rows += run_condition(Condition(dataset, per_class), args.workdir.resolve(), epochs=args.epochs)
    command = "python bench/evidence.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(rows, command.strip(), time.perf_counter() - start)
    print(section)
    if not args.no_write:
        write_results(section, Path(__file__).with_name("RESULTS.md"))


if __name__ == "__main__":
    main()
