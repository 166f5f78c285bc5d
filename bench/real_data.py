"""Real data: the Fashion-MNIST split task, adaptflow against simple references (issue 9, item 2).

Source: classes 0-4 (T-shirt/top, trouser, pullover, dress, coat), every official training image,
pretrain a resnet18 with ``adaptflow pretrain`` (once per workdir, cached). Target: classes 5-9
(sandal, shirt, sneaker, bag, ankle boot), N training images per class drawn from the official
training set (seeded; the draws are nested, the first 10 of a seed's 50 are its 10). Every
condition is scored on the official test images (t10k) of the target classes, which the pipeline
never sees: the registered model version is scored through ``adaptflow predict``; the pixel
references are fitted on exactly the files of the target ImageFolder.

    .venv/bin/python bench/real_data.py [--workdir .adaptflow/real-data] [--sizes 10,50,250] [--seeds 3]
        [--pretrain-epochs 3] [--no-write]

Needs Debian's ``dataset-fashion-mnist`` (IDX files in /usr/share/datasets/fashion-mnist).
Writes a Markdown table into bench/RESULTS.md under "Real data: Fashion-MNIST split task".
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean, stdev

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence import provenance, write_results
from fashion_mnist import (
    SOURCE_CLASSES,
    TARGET_CLASSES,
    DatasetMissing,
    draw,
    find_dataset_dir,
    load_split,
    pixels,
    tree_files,
    write_tree,
)

HEADING = "## Real data: Fashion-MNIST split task"
FULL_SIZES = (10, 50, 250)
FULL_SEEDS = 3
# Column order of the table; what each means is written under it (COLUMN_NOTES).
METHODS = ("adaptflow", "linear probe", "scratch", "logreg", "svc-rbf")
ADAPTFLOW_METHODS = {"adaptflow", "linear probe", "scratch"}
COLUMN_NOTES = {
    "adaptflow": "`adaptflow run` with the default config from the pretrained source weights "
    "(`backbone.weights_uri`, `backbone.sha256`, `seed`, `registry.model_name` set, nothing else); "
    "the registered version, whatever the gate decided",
    "linear probe": "the same run with `baseline.advisor.force=false`: the pipeline keeps its baseline "
    "(frozen backbone + logistic-regression head on cached features), which is what gets registered",
    "scratch": "the same network from a random init: `backbone.weights=none`, `backbone.input_size=32` "
    "(the pretrained weights' size; the from-scratch default would be 224 px) and "
    "`baseline.advisor.force=true` (always fine-tune; otherwise a random-feature probe could be registered)",
    "logreg": "scikit-learn `LogisticRegression(max_iter=2000)` on the raw 28x28 pixels / 255 of the "
    "target ImageFolder's files",
    "svc-rbf": "scikit-learn `SVC(kernel='rbf')` (defaults: C=1, gamma='scale') on the same pixels",
}


@dataclass
class Score:
    method: str
    size: int
    seed: int
    accuracy: float
    n_test: int
    version: str | None = None  # registered model version (adaptflow methods)
    promoted: bool | None = None
    winner: str | None = None  # the pipeline's winner candidate (baseline / finetune)
    gate: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------- adaptflow (CLI subprocesses)


def adaptflow(*args: str) -> dict:
    """Runs the ``adaptflow`` CLI next to this interpreter with ``--json``; its stdout, parsed."""
    exe = Path(sys.executable).with_name("adaptflow")
    cmd = [str(exe) if exe.exists() else "adaptflow", "--log-level", "WARNING", *args, "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def pretrain_source(
    workdir: Path, images: np.ndarray, labels: np.ndarray, epochs: int, per_class: int | None = None
) -> dict:
    """Source weights (cached per setting): ``adaptflow pretrain`` on every training image of 0-4
    (``per_class``: only the first N of each class, for the reduced test)."""
    tag = "" if per_class is None else f"-p{per_class}"
    out = workdir / f"source{tag}-resnet18-e{epochs}.safetensors"
    info = out.with_suffix(".bench.json")
    if out.exists() and info.exists():
        return json.loads(info.read_text())
    source = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in SOURCE_CLASSES])
    tree = write_tree(workdir / f"source{tag}", images, labels, np.sort(source), "train")
    result = adaptflow("pretrain", "--data", str(tree), "--out", str(out), "--epochs", str(epochs))
    result["uri"] = out.resolve().as_uri()
    result["epochs"] = epochs
    result["images"] = len(source)
    result["per_class"] = per_class
    info.write_text(json.dumps(result, indent=2))
    return result


def score_registered(model_uri: str, test: Path, settings: list[str]) -> tuple[float, int]:
    """Accuracy of a registered version on the official test tree, through ``adaptflow predict``."""
    rows = adaptflow("predict", "--model", model_uri, str(test), *settings)
    errors = [r for r in rows if r.get("error")]
    if errors:
        raise RuntimeError(f"predict failed on {len(errors)} images, e.g. {errors[0]}")
    correct = sum(r["label"] == Path(r["path"]).parent.name for r in rows)
    return correct / len(rows), len(rows)


def run_adaptflow(
    method: str, data: Path, test: Path, home: Path, source: dict, size: int, seed: int
) -> Score:
    name = f"fmnist-{method.replace(' ', '-')}-n{size}-s{seed}"
    common = [f"workdir={home}", f"seed={seed}", f"registry.model_name={name}"]
    extra = {
        "adaptflow": [f"backbone.weights_uri={source['uri']}", f"backbone.sha256={source['sha256']}"],
        "linear probe": [
            f"backbone.weights_uri={source['uri']}",
            f"backbone.sha256={source['sha256']}",
            "baseline.advisor.force=false",
        ],
        "scratch": ["backbone.weights=none", "backbone.input_size=32", "baseline.advisor.force=true"],
    }[method]
    sets = [a for o in (*common, *extra) for a in ("--set", o)]
    start = time.perf_counter()
    summary = adaptflow("run", "--data", str(data), *sets, "--force")
    version = summary.get("registered_version")
    if version is None:
        raise RuntimeError(f"{name}: nothing was registered: {summary.get('gate')}")
    accuracy, n = score_registered(f"models:/{name}/{version}", test, ["--set", f"workdir={home}"])
    return Score(
        method,
        size,
        seed,
        accuracy,
        n,
        str(version),
        bool(summary.get("promoted")),
        summary.get("winner"),
        list((summary.get("gate") or {}).get("reasons", [])),
        time.perf_counter() - start,
    )


def run_references(train: Path, test_xy: tuple[np.ndarray, np.ndarray], size: int, seed: int) -> list[Score]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    x, y = pixels(tree_files(train))
    x_test, y_test = test_xy
    scores = []
    for method, model in (("logreg", LogisticRegression(max_iter=2000)), ("svc-rbf", SVC(kernel="rbf"))):
        start = time.perf_counter()
        model.fit(x, y)
        accuracy = float(np.mean(model.predict(x_test) == y_test))
        scores.append(Score(method, size, seed, accuracy, len(y_test), seconds=time.perf_counter() - start))
    return scores


# ---------------------------------------------------------------- benchmark


@dataclass
class Bench:
    scores: list[Score]
    source: dict
    n_test: int
    skipped: list[tuple[int, int]] = field(default_factory=list)  # (size, seed) not started: budget spent
    kept: list[tuple[int, int]] = field(default_factory=list)  # (size, seed) resumed from scores.jsonl


def run_bench(
    workdir: Path,
    sizes: list[int],
    seeds: int,
    pretrain_epochs: int,
    methods: tuple[str, ...] = METHODS,
    source_per_class: int | None = None,
    budget_seconds: float | None = None,
    log: logging.Logger | None = None,
    resume: bool = False,
) -> Bench:
    """Every (seed, size) condition, seed by seed; with ``budget_seconds``, no condition starts after it.

    Each finished condition's scores are appended to ``workdir/scores.jsonl``; ``resume`` keeps the
    conditions found there (every method scored) and runs only the rest, so a time-boxed or
    interrupted run can be completed. Without it the file starts empty.
    """
    log = log or logging.getLogger("bench.real_data")
    workdir.mkdir(parents=True, exist_ok=True)
    folder = find_dataset_dir()
    train_x, train_y = load_split(folder, "train")
    test_x, test_y = load_split(folder, "t10k")
    official = np.flatnonzero(np.isin(test_y, TARGET_CLASSES))
    test = write_tree(workdir / "test", test_x, test_y, official, "t10k")
    test_xy = pixels(tree_files(test))
    t0 = time.perf_counter()
    source = pretrain_source(workdir, train_x, train_y, pretrain_epochs, source_per_class)
    log.warning("source weights ready (%.0f s): %s", time.perf_counter() - t0, source)
    home = workdir / "adaptflow"
    saved = workdir / "scores.jsonl"
    scores = load_scores(saved) if resume else []
    if not resume:
        saved.write_text("")
    done = {
        (size, seed)
        for size, seed in {(s.size, s.seed) for s in scores}
        if _complete(scores, size, seed, methods)
    }
    scores = [s for s in scores if (s.size, s.seed) in done]
    skipped: list[tuple[int, int]] = []
    for seed in range(seeds):
        for size in sizes:
            if (size, seed) in done:
                log.warning("n=%d seed=%d: kept from %s", size, seed, saved)
                continue
            if budget_seconds is not None and time.perf_counter() - t0 > budget_seconds:
                skipped.append((size, seed))
                continue
            data = write_tree(
                workdir / f"target-n{size}-seed{seed}", train_x, train_y, draw(train_y, size, seed), "train"
            )
            if {"logreg", "svc-rbf"} & set(methods):
                scores += [s for s in run_references(data, test_xy, size, seed) if s.method in methods]
            for method in methods:
                if method in ADAPTFLOW_METHODS:
                    scores.append(run_adaptflow(method, data, test, home, source, size, seed))
            with saved.open("a") as out:
                for s in scores[-len(methods) :]:
                    out.write(json.dumps(asdict(s)) + "\n")
                    log.warning("n=%d seed=%d %s: %.4f (%.0f s)", size, seed, s.method, s.accuracy, s.seconds)
    return Bench(scores, source, len(official), skipped, sorted(done))


def load_scores(path: Path) -> list[Score]:
    if not path.exists():
        return []
    return [Score(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _complete(scores: list[Score], size: int, seed: int, methods: tuple[str, ...]) -> bool:
    return set(methods) <= {s.method for s in scores if (s.size, s.seed) == (size, seed)}


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{mean(values):.3f} ± {stdev(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def markdown(bench: Bench, command: str, seconds: float, sizes: list[int], seeds: int, partial: str) -> str:
    scores, source = bench.scores, bench.source
    methods = [m for m in METHODS if any(s.method == m for s in scores)]
    by = {(s.method, s.size, s.seed): s for s in scores}
    seed_list = sorted({s.seed for s in scores})
    lines = [
        *provenance(HEADING, command),
        f"- total wall time: {seconds:.0f} s"
        + (
            f" (this invocation; {', '.join(f'n={n} seed {s}' for n, s in bench.kept)} kept from an earlier "
            "one with the same code through `--resume`)"
            if bench.kept
            else ""
        ),
        f"- run: sizes {', '.join(map(str, sizes))} images/class, seeds {', '.join(map(str, seed_list))}"
        + (f" — **partial run**: {partial}" if partial else " (the full requested grid)"),
        "- data: Fashion-MNIST (Debian `dataset-fashion-mnist`, 28x28 grayscale). Source = classes 0-4 "
        "(T-shirt, trouser, pullover, dress, coat), "
        + f"{source['images']} official training images ("
        + ("all of them" if source.get("per_class") is None else f"the first {source['per_class']} per class")
        + "), "
        f"`adaptflow pretrain --epochs {source.get('epochs', '?')}` (resnet18, input 32 px; source test "
        f"accuracy {source['source_test_accuracy']:.3f}, {source['seconds']:.0f} s). Target = classes 5-9 "
        "(sandal, shirt, sneaker, bag, ankle boot), N official training images per class drawn per seed "
        "(`numpy.random.default_rng(seed)`); the pipeline splits those N itself (train/val/test).",
        f"- test: the {bench.n_test} official t10k images of classes 5-9 for every row and method, never "
        "shown to the pipeline; adaptflow methods are scored as the registered model version through "
        "`adaptflow predict --model models:/NAME/VERSION --json` (ONNX, the model's stored preprocessing)",
        "",
        "Columns (accuracy on the official test images; chance = 0.200):",
        "",
        *[f"- **{m}**: {COLUMN_NOTES[m]}" for m in methods],
        "",
        "| imgs/class | seed | " + " | ".join(methods) + " | adaptflow: winner, promoted |",
        "|---|---|" + "---|" * len(methods) + "---|",
    ]
    for size in sizes:
        for seed in seed_list:
            if (methods[0], size, seed) not in by:
                continue
            cells = [f"{by[(m, size, seed)].accuracy:.3f}" if (m, size, seed) in by else "-" for m in methods]
            af = by.get(("adaptflow", size, seed))
            note = "-" if af is None else f"v{af.version} {af.winner}, {'yes' if af.promoted else 'no'}"
            lines.append(f"| {size} | {seed} | " + " | ".join(cells) + f" | {note} |")
        if not any(s.size == size for s in scores):
            continue
        cells = [_spread([s.accuracy for s in scores if s.method == m and s.size == size]) for m in methods]
        lines.append(
            f"| **{size}** | mean ± sd [min, max] | " + " | ".join(f"**{c}**" for c in cells) + " | |"
        )
    lines.append("")
    if "adaptflow" in methods:
        refs = [m for m in methods if m != "adaptflow"]
        verdicts = []
        for size in sizes:
            for seed in seed_list:
                af = by.get(("adaptflow", size, seed))
                if af is None:
                    continue
                lost = [
                    m for m in refs if (m, size, seed) in by and by[(m, size, seed)].accuracy >= af.accuracy
                ]
                verdicts.append((size, seed, lost))
        wins = sum(not lost for *_, lost in verdicts)
        detail = "; ".join(f"n={n} seed {s}: not above {', '.join(lost)}" for n, s, lost in verdicts if lost)
        detail += (
            " — a tie with the linear probe means adaptflow kept and registered its baseline"
            if any("linear probe" in lost for *_, lost in verdicts)
            else ""
        )
        lines.append(
            f"**Did adaptflow's registered model beat every reference ({', '.join(refs)})?** "
            + ("yes" if wins == len(verdicts) else "no")
            + f": in {wins} of {len(verdicts)} size/seed runs"
            + (f" ({detail})" if detail else "")
            + ". Promoted to champion (gate incl. the pixel-logreg reference floor): "
            + f"{sum(bool(by[('adaptflow', n, s)].promoted) for n, s, _ in verdicts)} of {len(verdicts)}."
        )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path(".adaptflow/real-data"))
    parser.add_argument("--sizes", default="10,50,250", help="target training images per class")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per size (0..N-1; draw and training)")
    parser.add_argument(
        "--pretrain-epochs", type=int, default=3, help="source pretraining epochs (cached per value)"
    )
    parser.add_argument(
        "--partial", default="", help="say in the table why this is a partial run (e.g. time-boxed)"
    )
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="start no new size/seed condition after this many seconds (the table then says which were skipped)",
    )
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the conditions already in WORKDIR/scores.jsonl, run the rest",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    reduced = (
        []
        if sizes == list(FULL_SIZES) and args.seeds >= FULL_SEEDS
        else [f"a reduced grid (the full one is sizes {','.join(map(str, FULL_SIZES))} x {FULL_SEEDS} seeds)"]
    )
    partial = "; ".join(reduced + ([args.partial] if args.partial else []))
    start = time.perf_counter()
    try:
        bench = run_bench(
            args.workdir.resolve(),
            sizes,
            args.seeds,
            args.pretrain_epochs,
            budget_seconds=args.budget_seconds,
            resume=args.resume,
        )
    except DatasetMissing as error:
        sys.exit(f"error: {error}")
    bench.source.setdefault("epochs", args.pretrain_epochs)
    if bench.skipped:
        partial = "; ".join(
            [
                *([partial] if partial else []),
                f"time budget of {args.budget_seconds:.0f} s spent, not run: "
                + ", ".join(f"n={n} seed {s}" for n, s in bench.skipped),
            ]
        )
    command = "python bench/real_data.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(bench, command.strip(), time.perf_counter() - start, sizes, args.seeds, partial)
    print(section)
    if not args.no_write:
        write_results(section, Path(__file__).with_name("RESULTS.md"), HEADING)


if __name__ == "__main__":
    main()
