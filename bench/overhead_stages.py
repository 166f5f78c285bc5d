"""bench/overhead.py's measurements of real stages: MLflow's share of training, and a whole run's wall.

- :func:`measure_tracking`: the finetune step in this process, every tracking call timed by wrapping it.
- :func:`measure_run`: ``adaptflow run`` on Fashion-MNIST images; the stages' own seconds (their nested
  MLflow runs), each task's wall (kfp.local's log) and the run's wall.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GOALS = {"task": 1.5, "tracking": 0.02, "outside": 0.15}
ENV = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


def verdict(value: float, goal: float) -> str:
    return "meets the goal" if value <= goal else "**misses the goal**"


# ------------------------------------------------------------------------------------ tracking
class Timers:
    """Wall seconds of wrapped calls by label; a call made inside another timed call is not counted twice."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.depth = 0
        self.undo: list[tuple[Any, str, Any]] = []

    def add(self, label: str, seconds: float, call: bool = True) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds
        self.calls[label] = self.calls.get(label, 0) + call

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.depth:
                return original(*args, **kwargs)
            self.depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1
                self.add(label, time.perf_counter() - start)

        self.undo.append((owner, name, original))
        setattr(owner, name, timed)

    def wrap_context(self, owner: Any, name: str, label: str) -> None:
        """A context manager: its enter and its exit are timed, not the block."""
        original = getattr(owner, name)

        @contextlib.contextmanager
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with contextlib.ExitStack() as stack:
                start = time.perf_counter()
                value = stack.enter_context(original(*args, **kwargs))
                self.add(label, time.perf_counter() - start)
                yield value
                start = time.perf_counter()
            self.add(label, time.perf_counter() - start, call=False)

        self.undo.append((owner, name, original))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)


MLFLOW_CALLS = "log_params log_param log_metrics log_metric log_artifact log_artifacts log_dict log_text set_tag set_tags"


def measure_tracking(workdir: Path, epochs: int | None) -> dict[str, Any]:
    """The finetune step in this process; its tracking calls timed against ``run_finetune``."""
    import mlflow
    from adaptflow.pipelines.local import write_run_config

    import adaptflow.plots
    import adaptflow.steps as steps
    import adaptflow.training.finetune as finetune
    from adaptflow.config import load_settings
    from adaptflow.contracts import Candidate
    from adaptflow.demo import prepare_demo
    from adaptflow.tracking import start_pipeline_run

    assets = prepare_demo(workdir / "assets")
    home = workdir / f"tracking-{time.strftime('%H%M%S')}"
    overrides = [
        f"workdir={home}",
        f"backbone.weights_uri={assets.weights_uri}",
        f"backbone.sha256={assets.sha256}",
    ]
    settings = load_settings(overrides=overrides + ([f"finetune.epochs={epochs}"] if epochs else []))
    config = str(write_run_config(settings, home))
    parent = start_pipeline_run(settings, "overhead-tracking", {}).parent_run_id
    out = {name: str(home / name) for name in ("ingest", "baseline", "finetune")}
    fp = steps.ingest_step(str(assets.data / "target"), config, parent, out["ingest"], force=True).fingerprint
    steps.baseline_step(out["ingest"], config, parent, fp, out["baseline"])
    timers = Timers()
    timers.wrap(steps, "_context", "MLflow setup: pipeline run read")
    timers.wrap_context(steps, "stage_run", "nested run: create, start, end")
    for name in MLFLOW_CALLS.split():
        timers.wrap(mlflow, name, f"mlflow.{name}")
    timers.wrap(adaptflow.plots, "learning_curves_png", "learning-curve plot (logged artifact)")
    timers.wrap(finetune, "run_finetune", "TRAINING")
    try:
        start = time.perf_counter()
        steps.finetune_step(out["ingest"], out["baseline"], config, parent, fp, out["finetune"])
        step_wall = time.perf_counter() - start
    finally:
        timers.restore()
    training = timers.seconds.pop("TRAINING")
    epochs_run = Candidate.load(out["finetune"]).cost.epochs_run
    return {
        "training": training,
        "step": step_wall,
        "calls": timers.calls,
        "seconds": timers.seconds,
        "epochs_run": epochs_run,
    }


# ------------------------------------------------------------------------------------ run
def fashion_tree(workdir: Path, images: int) -> Path:
    """``images`` Fashion-MNIST training images of classes 5-9 (as many per class), as an ImageFolder."""
    from fashion_mnist import draw, find_dataset_dir, load_split, write_tree

    x, y = load_split(find_dataset_dir(), "train")
    return write_tree(workdir / f"fmnist-{images}", x, y, draw(y, images // 5, seed=0), "train")


# kfp.local's own log lines (task names are in ANSI colours)
STAMP = r"^(\d\d):(\d\d):(\d\d\.\d+) - INFO - "
TASK_START = re.compile(STAMP + r"Executing task \S*?'([\w-]+)'")
TASK_END = re.compile(STAMP + r"Task \S*?'([\w-]+)'\S* finished")


def task_walls(log: str) -> dict[str, float]:
    """Each task's wall seconds (kfp.local's "Executing task" to "Task ... finished"), in run order."""
    started: dict[str, float] = {}
    walls: dict[str, float] = {}
    for line in log.splitlines():
        for pattern in (TASK_START, TASK_END):
            m = pattern.match(line)
            if m:
                at = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
                if pattern is TASK_START:
                    started[m.group(4)] = at
                else:
                    walls[m.group(4)] = (at - started[m.group(4)]) % 86400
    return walls


def measure_run(workdir: Path, images: int, sets: list[str], round_: int) -> dict[str, Any]:
    """One ``adaptflow run`` on a fresh workdir whose MLflow store exists (a first run's one-off schema
    migrations are not the run's cost): wall, the DAG's wall, each task's wall and each stage's seconds."""
    from adaptflow.config import load_settings
    from adaptflow.demo import prepare_demo
    from adaptflow.tracking import embedded_tracking_uri, ensure_experiment

    assets = prepare_demo(workdir / "assets")
    data = fashion_tree(workdir, images)
    home = workdir / f"run-{images}-{round_}"
    shutil.rmtree(home, ignore_errors=True)
    overrides = [
        f"workdir={home}",
        f"backbone.weights_uri={assets.weights_uri}",
        f"backbone.sha256={assets.sha256}",
    ]
    ensure_experiment(
        embedded_tracking_uri(home), load_settings(overrides=overrides).tracking.experiment, home
    )
    exe = Path(sys.executable).with_name("adaptflow")
    cmd = [str(exe), "run", "--data", str(data), "--json"]
    cmd += [a for o in (*overrides, *sets) for a in ("--set", o)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    summary = json.loads(done.stdout)
    stages: dict[str, float] = summary["stage_seconds"]
    counts = summary["dataset"]["counts"]
    return {
        "wall": wall,
        "dag": summary["kfp"]["wall_seconds"],
        "stages": stages,
        "tasks": task_walls(done.stderr),
        "counts": counts,
    }


def tracking_section(result: dict[str, Any]) -> list[str]:
    total = sum(result["seconds"].values())
    share = total / result["training"]
    rows = sorted(result["seconds"].items(), key=lambda kv: -kv[1])
    return [
        "### MLflow's share of training (finetune step, demo digits target, in one process)",
        "",
        f"Training (`run_finetune`, {result['epochs_run']} epochs) {result['training']:.2f} s; the whole step "
        f"{result['step']:.2f} s; tracking {total:.3f} s = **{share:.2%}** of training, goal "
        f"{GOALS['tracking']:.0%}: {verdict(share, GOALS['tracking'])}.",
        "",
        "| tracking call | calls | s |",
        "|---|---|---|",
        *[f"| {name} | {result['calls'][name]} | {seconds:.3f} |" for name, seconds in rows],
    ]


def run_section(runs: list[dict[str, Any]], images: int, sets: list[str]) -> list[str]:
    lines = [
        f"### Run wall outside stage compute (`adaptflow run`, {images} Fashion-MNIST images)",
        "",
        "Each round: a fresh workdir (cold caches) whose MLflow store exists. Stage compute = the sum of the "
        "stages' nested MLflow runs (`stage_seconds`, timed inside each stage process); before/after the DAG = "
        "wall - the DAG's wall (CLI start and exit, imports, weights, MLflow setup, summary); in task processes "
        "= each task's wall (kfp.local's log) - its stage's seconds; kfp.local = the DAG's wall - the tasks' walls."
        + (f" Overrides: `{' '.join(sets)}`." if sets else ""),
        "",
        "| round | images (train/val/test) | wall s | stage compute s | before/after DAG s | in task processes s "
        "| kfp.local s | outside share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    shares = []
    for i, r in enumerate(runs, 1):
        compute, tasks = sum(r["stages"].values()), sum(r["tasks"].values())
        shares.append((r["wall"] - compute) / r["wall"])
        c = r["counts"]
        lines.append(
            f"| {i} | {c.get('train')}/{c.get('val')}/{c.get('test')} | {r['wall']:.1f} | {compute:.1f} "
            f"| {r['wall'] - r['dag']:.1f} | {tasks - compute:.1f} | {r['dag'] - tasks:.1f} | {shares[-1]:.1%} |"
        )
    share = statistics.median(shares)
    lines += [
        "",
        f"Outside share (median): {share:.1%}, goal {GOALS['outside']:.0%}: {verdict(share, GOALS['outside'])}.",
        "",
        "Per task (median over rounds): task wall, its stage's own seconds, and the rest (process start, "
        "imports, MLflow setup, exit):",
        "",
        "| task | task wall s | stage s | outside s |",
        "|---|---|---|---|",
    ]
    for task in runs[0]["tasks"]:
        wall = statistics.median(r["tasks"].get(task, 0.0) for r in runs)
        stage = statistics.median(r["stages"].get(task, 0.0) for r in runs)
        lines.append(f"| {task} | {wall:.1f} | {stage:.1f} | {wall - stage:.1f} |")
    return lines
