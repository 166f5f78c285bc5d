"""Transfer learning versus fine-tuning on the split-task digits (Yosinski et al. 2014), measured.

Source digits 0-4 pretrain a resnet18 (``adaptflow.demo.prepare_demo``); the targets are digits 5-9
as they are (``target/``, in-domain), inverted + rotated (``target-shifted/``) and drawn in texture
(``target-texture/``, see ``adaptflow.data.demo``). Each target is run
with all its training images and with a few per class (a deterministic subsample of the snapshot's
train split; val and test unchanged), and each condition compares: the frozen baseline (linear probe
on cached features), fine-tuning (``partial``, ``full``) and the from-scratch control (``scratch``),
once per training seed (``--seeds``): the snapshot and its test split stay the same, only the
initialisation and the order of the training batches change.

    .venv/bin/python bench/evidence.py [--workdir .adaptflow] [--epochs 12] [--few 10] [--seeds 3] [--no-write]

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
from statistics import mean

HEADING = "## Transfer vs fine-tuning evidence"
STRATEGIES = ("partial", "full", "scratch")


@dataclass(frozen=True)
class Condition:
    dataset: str  # one of adaptflow.demo.TARGET_TREES
    train_per_class: int | None  # None: every training image


@dataclass(frozen=True)
class Row:
    condition: Condition
    seed: int
    strategy: str
    accuracy: float
    ci: tuple[float, float]
    macro_f1: float
    trainable_params: int
    wall_seconds: float
    train_val_gap: float
    p_value_vs_baseline: float | None
    advisor_finetune: bool
    advisor_strategy: str
    advisor_reason: str
    domain_shift: float | None
    best: str


def overrides(workdir: Path, weights_uri: str, sha256: str, epochs: int, seed: int = 0) -> list[str]:
    return [
        f"workdir={workdir}",
        f"seed={seed}",
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
    epochs: int = 12,
    seed: int = 0,
    extra: tuple[str, ...] = (),
) -> list[Row]:
    from adaptflow.pipelines.local import run_compare_local

    from adaptflow.config import load_settings
    from adaptflow.demo import prepare_demo

    assets = prepare_demo(workdir)
    per_class = (
        () if condition.train_per_class is None else (f"ingest.train_per_class={condition.train_per_class}",)
    )
    settings = load_settings(
        overrides=[*overrides(workdir, assets.weights_uri, assets.sha256, epochs, seed), *per_class, *extra]
    )
    name = f"{condition.dataset}-{condition.train_per_class or 'all'}-seed{seed}" + "".join(
        f"-{o}" for o in extra
    )
    data = str(assets.data / condition.dataset)
    result = run_compare_local(settings, data, list(strategies), workdir / "evidence" / name)
    shift = result.decision.signals.get("domain_shift")
    return [
        Row(
            condition,
            seed,
            o.strategy,
            o.score.accuracy,
            o.score.accuracy_ci95,
            o.score.macro_f1,
            o.trainable_params,
            o.wall_seconds,
            o.train_val_gap,
            o.p_value_vs_baseline,
            result.decision.should_finetune,
            result.decision.strategy
            + (
                ""
                if result.decision.layer_decay is None
                else f" (layer_decay {result.decision.layer_decay:g})"
            ),
            result.decision.reason,
            float(shift) if isinstance(shift, (int, float)) else None,
            result.best,
        )
        for o in result.outcomes
    ]


def markdown(rows: list[Row], command: str, seconds: float) -> str:
    machine = machine_line()
    lines = [
        HEADING,
        "",
        f"- machine: {machine}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- command: `{command}`",
        f"- total wall time: {seconds:.0f} s",
        "- data: scikit-learn digits at 32 px; source = digits 0-4 (pretrained resnet18), target = 5-9, "
        "target-shifted = 5-9 inverted and rotated 90°, target-texture = 5-9 drawn by stripe orientation; "
        "test split identical across rows of a condition",
        "- p vs baseline: McNemar's exact test on the same test images; domain shift: BatchNorm-statistics KL "
        "(adaptflow.training.shift); advisor: its decision with the default config (choose_strategy on)",
        "",
        'Accuracy is the mean over seeds with the lowest and highest seed in brackets; "beats baseline" counts '
        "the seeds in which the strategy's test accuracy is above the baseline's of the same seed; p is McNemar's "
        "exact test against that baseline, per seed. Costs are means.",
        "",
        "| target | train imgs/class | strategy | test accuracy, mean [min, max] | beats baseline | p vs baseline per seed | macro-F1 | trainable params | wall s | train-val gap | domain shift | advisor (seed 0) | best by margin rule, per seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[Condition, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.condition, r.strategy), []).append(r)
    baselines = {(r.condition, r.seed): r.accuracy for r in rows if r.strategy == "baseline"}
    for (c, strategy), rs in groups.items():
        acc = [r.accuracy for r in rs]
        wins = (
            "-"
            if strategy == "baseline"
            else f"{sum(r.accuracy > baselines[(c, r.seed)] for r in rs)}/{len(rs)}"
        )
        p_values = (
            ", ".join(f"{r.p_value_vs_baseline:.2g}" for r in rs if r.p_value_vs_baseline is not None) or "-"
        )
        first = rs[0]
        shift = "-" if first.domain_shift is None else f"{first.domain_shift:.3f}"
        advice = f"fine-tune {first.advisor_strategy}" if first.advisor_finetune else "keep baseline"
        lines.append(
            f"| {c.dataset} | {c.train_per_class or 'all'} | {strategy} | {mean(acc):.3f} [{min(acc):.3f}, {max(acc):.3f}] "
            f"| {wins} | {p_values} | {mean(r.macro_f1 for r in rs):.3f} | {first.trainable_params:,} "
            f"| {mean(r.wall_seconds for r in rs):.1f} | {mean(r.train_val_gap for r in rs):+.3f} | {shift} "
            f"| {advice} | {', '.join(r.best for r in rs)} |"
        )
    return "\n".join(lines) + "\n"


def machine_line() -> str:
    import torch

    return (
        f"{platform.node() or 'unknown'}: {platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
        + (
            f"CUDA {torch.cuda.get_device_name(0)}"
            if torch.cuda.is_available()
            else f"CPU ({torch.get_num_threads()} threads)"
        )
    )


def provenance(heading: str, command: str) -> list[str]:
    """A results section's first lines: its heading, then the machine, date and command."""
    return [
        heading,
        "",
        f"- machine: {machine_line()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- command: `{command}`",
    ]


def write_results(section: str, path: Path, heading: str = HEADING) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section + "\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    path.write_text(text)


def publish(
    lines: list[str], heading: str, write: bool, path: Path = Path(__file__).with_name("RESULTS.md")
) -> str:
    """A bench's section: printed, and (``write``) put under ``heading`` in bench/RESULTS.md."""
    section = "\n".join(lines) + "\n"
    print(section)
    if write:
        write_results(section, path, heading)
    return section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path(".adaptflow"))
    parser.add_argument(
        "--epochs", type=int, default=12, help="fine-tuning epochs (finetune.epochs' default)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per condition")
    parser.add_argument(
        "--few", type=int, default=10, help="train images per class in the few-images condition"
    )
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    rows: list[Row] = []
    from adaptflow.demo import TARGET_TREES

    for dataset in TARGET_TREES:
        for per_class in (None, args.few):
            for seed in range(args.seeds):
                rows += run_condition(
                    Condition(dataset, per_class), args.workdir.resolve(), epochs=args.epochs, seed=seed
                )
    command = "python bench/evidence.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(rows, command.strip(), time.perf_counter() - start)
    print(section)
    if not args.no_write:
        write_results(section, Path(__file__).with_name("RESULTS.md"))


if __name__ == "__main__":
    main()
