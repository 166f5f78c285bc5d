"""The advisor, checked on the real-data conditions: its cost estimate and its choice (issue 9, item 5).

For every Fashion-MNIST split-task condition of bench/real_data.py (10/50/250 images per class x
seeds) and, with ``--demo``, the demo's three targets, this runs ``adaptflow compare`` with the
default config. That trains the baseline, which holds the advisor's decision and signals, and then
every fine-tuning strategy. From its result it reads:

- **cost**: the advisor's expected fine-tuning seconds (``estimated_finetune_seconds``: steady-state
  steps through the real loader x early stopping's expected epochs) against the wall time of the
  strategy it chose, and the epochs that strategy ran against the expected ones;
- **decision**: what the advisor chose (the baseline, or ``finetune-<strategy>``), what compare
  found best (its own rule, on the pipeline's test split), and each model's accuracy on the
  official test images (t10k, 5000 images), which neither saw. "Left on the table" is the best
  model's t10k accuracy minus the advisor's choice's.

    .venv/bin/python bench/advisor_check.py [--workdir .adaptflow/real-data] [--sizes 10,50,250]
        [--seeds 3] [--demo] [--no-write]

Timing rows are only meaningful on an otherwise idle machine. Writes two tables into
bench/RESULTS.md under "Advisor on real data".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence import provenance, write_results
from fashion_mnist import TARGET_CLASSES, draw, find_dataset_dir, load_split, write_tree
from real_data import adaptflow, pretrain_source

HEADING = "## Advisor on real data: cost estimate and decisions"
DEMO_TARGETS = ("target", "target-shifted", "target-texture")


@dataclass(frozen=True)
class Condition:
    name: str
    data: Path
    sets: list[str]
    test: Path | None  # an ImageFolder of held-out images, or None (demo: the pipeline's test split only)


@dataclass(frozen=True)
class Checked:
    condition: str
    choice: str  # "baseline" or "finetune-<strategy>"
    chosen_strategy: str
    reason: str
    expected_seconds: float
    max_seconds: float
    expected_epochs: float
    planned_epochs: int
    actual_seconds: float
    actual_epochs: int
    compare_best: str
    split_accuracy: dict[str, float]  # model -> accuracy on the pipeline's test split
    heldout_accuracy: dict[str, float]  # model -> accuracy on the held-out test images
    test_size: int


def heldout_accuracy(run_dir: Path, test: Path) -> dict[str, float]:
    """Every candidate the compare run saved, scored on the held-out ImageFolder ``test``."""
    import torch

    from adaptflow.data.images import load_tensor_batch
    from adaptflow.training.candidates import load_candidate

    files = sorted(test.glob("*/*.png"))
    out = {}
    for saved in sorted(run_dir.glob("**/candidate/candidate.json")):
        candidate, model = load_candidate(saved.parent)
        index = {name: i for i, name in enumerate(candidate.class_names)}
        labels = torch.tensor([index[f.parent.name] for f in files])
        correct = 0
        with torch.inference_mode():
            for start in range(0, len(files), 500):
                batch = load_tensor_batch(list(files[start : start + 500]), candidate.preprocessing)
                correct += int((model(batch).argmax(1) == labels[start : start + 500]).sum())
        out[candidate.name] = correct / len(files)
    return out


def check(condition: Condition, home: Path) -> Checked:
    sets = [a for o in (f"workdir={home}", *condition.sets) for a in ("--set", o)]
    before = set((home / "kfp-local").glob("adaptflow-compare-*"))
    result = adaptflow(
        "compare", "--data", str(condition.data), *sets, "--out", str(home / "compare" / condition.name)
    )
    (run_dir,) = set((home / "kfp-local").glob("adaptflow-compare-*")) - before
    decision, signals = result["decision"], result["decision"]["signals"]
    outcomes = {o["candidate"]: o for o in result["outcomes"]}
    chosen = outcomes[f"finetune-{decision['strategy']}"]
    return Checked(
        condition=condition.name,
        choice=f"finetune-{decision['strategy']}" if decision["should_finetune"] else "baseline",
        chosen_strategy=decision["strategy"],
        reason=decision["reason"],
        expected_seconds=float(signals["estimated_finetune_seconds"]),
        max_seconds=float(signals["max_finetune_seconds"]),
        expected_epochs=float(signals["expected_finetune_epochs"]),
        planned_epochs=int(signals["planned_finetune_epochs"]),
        actual_seconds=float(chosen["wall_seconds"]),
        actual_epochs=int(chosen["epochs_run"]),
        compare_best=result["best"],
        split_accuracy={name: float(o["score"]["accuracy"]) for name, o in outcomes.items()},
        heldout_accuracy=heldout_accuracy(run_dir, condition.test) if condition.test else {},
        test_size=int(result["test_size"]),
    )


def conditions(workdir: Path, sizes: list[int], seeds: int, demo: bool) -> list[Condition]:
    folder = find_dataset_dir()
    train_x, train_y = load_split(folder, "train")
    test_x, test_y = load_split(folder, "t10k")
    test = write_tree(
        workdir / "test", test_x, test_y, np.flatnonzero(np.isin(test_y, TARGET_CLASSES)), "t10k"
    )
    source = pretrain_source(workdir, train_x, train_y, 3)
    weights = [f"backbone.weights_uri={source['uri']}", f"backbone.sha256={source['sha256']}"]
    out = [
        Condition(
            f"n={size} seed={seed}",
            write_tree(
                workdir / f"target-n{size}-seed{seed}", train_x, train_y, draw(train_y, size, seed), "train"
            ),
            [*weights, f"seed={seed}"],
            test,
        )
        for seed in range(seeds)
        for size in sizes
    ]
    if demo:
        from adaptflow.demo import prepare_demo

        assets = prepare_demo((workdir / "demo-home").resolve())
        pinned = [f"backbone.weights_uri={assets.weights_uri}", f"backbone.sha256={assets.sha256}"]
        out += [Condition(f"demo {name}", assets.data / name, pinned, None) for name in DEMO_TARGETS]
    return out


def _within(expected: float, actual: float) -> str:
    error = expected / actual - 1 if actual else float("inf")
    return f"{error:+.0%}" + ("" if abs(error) <= 0.25 else " **outside**")


def markdown(rows: list[Checked], command: str, seconds: float) -> str:
    inside = sum(abs(r.expected_seconds / r.actual_seconds - 1) <= 0.25 for r in rows if r.actual_seconds)
    lines = [
        *provenance(HEADING, command),
        f"- total wall time: {seconds:.0f} s",
        "- each row: `adaptflow compare` with the default config (source weights pinned, `seed` = the draw's seed);"
        " Fashion-MNIST rows are bench/real_data.py's conditions, demo rows the demo's targets with its source backbone",
        "",
        "### Cost: the advisor's estimate against the chosen strategy's fine-tuning wall time",
        "",
        "| condition | strategy | expected s | max s (all epochs) | actual s | error | s/epoch: estimated, actual "
        "| expected epochs | ran / planned |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_epoch = r.expected_seconds / r.expected_epochs if r.expected_epochs else 0.0
        actual_epoch = r.actual_seconds / r.actual_epochs if r.actual_epochs else 0.0
        lines.append(
            f"| {r.condition} | {r.chosen_strategy} | {r.expected_seconds:.1f} | {r.max_seconds:.1f} | "
            f"{r.actual_seconds:.1f} | {_within(r.expected_seconds, r.actual_seconds)} | "
            f"{per_epoch:.2f}, {actual_epoch:.2f} ({per_epoch / actual_epoch - 1:+.0%}) | {r.expected_epochs:.1f} | "
            f"{r.actual_epochs} / {r.planned_epochs} |"
        )
    per_epoch_inside = sum(
        abs((r.expected_seconds / r.expected_epochs) / (r.actual_seconds / r.actual_epochs) - 1) <= 0.25
        for r in rows
        if r.expected_epochs and r.actual_epochs
    )
    lines += [
        "",
        f"**Within ±25% of the actual wall time:** {inside} of {len(rows)} rows. "
        f"Per epoch (the measured step and validation pass alone, without early stopping's length): "
        f"{per_epoch_inside} of {len(rows)}.",
        "",
        "### Decisions: what the advisor chose, what compare found best, and what the choice left on the table",
        "",
        "Accuracy on the official test images (t10k, 5000) for Fashion-MNIST rows; the demo rows have only the "
        "pipeline's own test split. Left on the table = the best model's held-out accuracy minus the choice's.",
        "",
        "| condition | advisor chose | compare best (test split, n) | choice held-out | best held-out (model) | left on the table |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        scores = r.heldout_accuracy or r.split_accuracy
        best_name = max(scores, key=lambda k: scores[k])
        lines.append(
            f"| {r.condition} | {r.choice} | {r.compare_best} ({r.test_size}) | {scores.get(r.choice, float('nan')):.3f} | "
            f"{scores[best_name]:.3f} ({best_name}) | {scores[best_name] - scores.get(r.choice, float('nan')):+.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(".adaptflow/real-data"))
    parser.add_argument("--sizes", default="10,50,250")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--demo", action="store_true", help="add the demo's three targets")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--from-saved",
        type=float,
        metavar="SECONDS",
        help="render the rows saved by an earlier run (its wall time)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    home = args.workdir / "advisor-check"
    rows = []
    if args.from_saved is not None:
        lines = (home / "checked.jsonl").read_text().splitlines()
        rows = [Checked(**json.loads(line)) for line in lines if line.strip()]
        start -= args.from_saved
    todo = (
        []
        if rows
        else conditions(args.workdir, [int(s) for s in args.sizes.split(",")], args.seeds, args.demo)
    )
    for condition in todo:
        row = check(condition, home)
        rows.append(row)
        with (home / "checked.jsonl").open("a") as saved:
            saved.write(json.dumps(row.__dict__) + "\n")
        print(
            f"{row.condition}: {row.choice}, expected {row.expected_seconds:.1f}s actual {row.actual_seconds:.1f}s"
        )
    command = "python bench/advisor_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(rows, command.strip(), time.perf_counter() - start)
    print(section)
    if not args.no_write:
        write_results(section, Path(__file__).resolve().parent / "RESULTS.md", HEADING)


if __name__ == "__main__":
    main()
