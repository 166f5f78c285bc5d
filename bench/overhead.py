"""Orchestration overhead (issue 12): what a run pays outside its stages' own work.

- **tasks**: per-task kfp.local overhead on an empty stage. Chains of 1 and ``--tasks`` empty tasks
  run through adaptflow's own launcher (``adaptflow.pipelines.local.kfp_local_run``:
  ``SubprocessRunner(use_venv=False)``, components with ``install_kfp_package=False``, stage
  processes as ``adaptflow.pipelines.local_process`` runs them); per task = the slope. Three empty
  components: ``kfp`` returns at once; ``config`` runs a step's prologue (the run's config file
  parsed, logging set up: ``adaptflow.stage_setup.stage_settings``, in ``reports_errors`` as every step);
  ``stage`` is the empty stage: that prologue, the step's MLflow setup (``open_stage``: the pipeline run
  read from the store) and an empty nested stage run (``tracking.stage_run``). Goal: the empty stage
  at most 1.5 s per task. The split comes from one probe process doing what a component process
  does, timed inside: python start and exit, imports (kfp's executor, ``adaptflow.steps``, mlflow),
  the prologue, the MLflow store opened, the nested run; then ``-X importtime`` of each real step's
  own imports.
- **tracking**: MLflow's share of training (overhead_stages.py). The finetune step runs in this
  process on the demo's digits; every tracking call (the run lookup, the nested run's start and end,
  ``mlflow.log_*``, ``set_tag*``, the learning-curve plot) is timed by wrapping it here (outermost
  call only); training is ``run_finetune``. Goal: at most 2 %.
- **run**: ``adaptflow run --json`` on ``--images`` Fashion-MNIST images (classes 5-9, Debian's
  ``dataset-fashion-mnist``) from the demo's digits-pretrained resnet18 (overhead_stages.py), on a
  fresh workdir each round. Stage compute = the sum of ``stage_seconds`` (each stage's nested MLflow
  run, timed inside its own process); outside = wall - compute, split into the CLI before and after
  the DAG, the task processes around their stages, and kfp.local. Goal: outside at most 15 %.

Usage: ``python bench/overhead.py [--parts tasks,tracking,run] [--rounds 3] [--tasks 5] [--epochs N]
[--images 5000] [--run-rounds 1] [--set key=value ...] [--workdir /tmp/adaptflow-overhead] [--no-write]``
"""

# no `from __future__ import annotations`: kfp reads the empty components' annotations as types
import argparse
import contextlib
import io
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evidence import provenance, write_results
from overhead_stages import ENV, GOALS, measure_run, measure_tracking, run_section, tracking_section, verdict

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Orchestration overhead (issue 12)"


# ------------------------------------------------------------------------------------ tasks
def empty_kfp(config_json: str, parent_run_id: str) -> str:
    return parent_run_id


def empty_config(config_json: str, parent_run_id: str) -> str:
    from adaptflow.stage_setup import stage_settings as _settings
    from adaptflow.steps import reports_errors

    reports_errors("empty")(_settings)(config_json, uses_torch=False)
    return parent_run_id


def empty_stage(config_json: str, parent_run_id: str) -> str:
    from adaptflow.stage_setup import open_stage
    from adaptflow.steps import reports_errors
    from adaptflow.tracking import stage_run

    @reports_errors("empty")
    def step() -> None:
        _, ctx = open_stage(config_json, parent_run_id, uses_torch=False)
        with stage_run(ctx, "empty"):
            pass

    step()
    return parent_run_id


LEVELS: dict[str, Callable[[str, str], str]] = {
    "kfp": empty_kfp,
    "config": empty_config,
    "stage": empty_stage,
}

PROBE = """
import json, sys, time
t = [time.perf_counter()]
import kfp.dsl.executor_main
t.append(time.perf_counter())
from adaptflow.stage_setup import stage_context as _context
from adaptflow.stage_setup import stage_settings as _settings
from adaptflow.steps import _spare_exit_collection
from adaptflow.tracking import stage_run
t.append(time.perf_counter())
settings = _settings(sys.argv[1], uses_torch=False)
t.append(time.perf_counter())
import mlflow
t.append(time.perf_counter())
ctx = _context(settings, sys.argv[2])
t.append(time.perf_counter())
with stage_run(ctx, "probe"):
    pass
t.append(time.perf_counter())
print(json.dumps([b - a for a, b in zip(t, t[1:])]))
_spare_exit_collection()  # as a step ends in a component process (adaptflow.steps.reports_errors)
"""
PROBE_PARTS = (
    "import kfp (kfp.dsl.executor_main)",
    "import adaptflow.steps",
    "step prologue: settings and logging (torch threads only in torch stages)",
    "import mlflow",
    "MLflow setup: store opened, pipeline run read",
    "MLflow: empty nested stage run",
)


def chain(component: Any, tasks: int) -> Any:
    from kfp import dsl

    @dsl.pipeline(name=f"overhead-{tasks}")
    def dag(config_json: str, parent_run_id: str) -> str:
        task = component(config_json=config_json, parent_run_id=parent_run_id)
        for _ in range(tasks - 1):
            task = component(config_json=config_json, parent_run_id=task.output)
        return task.output  # type: ignore[no-any-return]

    return dag


def measure_tasks(
    workdir: Path, rounds: int, tasks: int
) -> tuple[dict[str, list[float]], list[list[float]], list[float]]:
    """Per-task seconds (slope) by level, the probe's parts per round, and the probe's process walls."""
    from adaptflow.pipelines.local import kfp_local_run, write_run_config
    from kfp import dsl

    from adaptflow.config import load_settings
    from adaptflow.tracking import start_pipeline_run

    settings = load_settings(overrides=[f"workdir={workdir}"])
    config = str(write_run_config(settings, workdir))
    parent = start_pipeline_run(settings, "overhead", {}).parent_run_id
    components = {
        name: dsl.component(base_image="adaptflow", install_kfp_package=False)(func)
        for name, func in LEVELS.items()
    }
    slopes: dict[str, list[float]] = {name: [] for name in LEVELS}
    probes: list[list[float]] = []
    walls: list[float] = []
    with contextlib.redirect_stderr(io.StringIO()), kfp_local_run(workdir / "kfp-local"):
        chain(components["kfp"], 1)(config_json=config, parent_run_id=parent)  # warm-up: kfp.local's imports
    for round_ in range(rounds):
        for name, component in components.items():
            seconds = {}
            for n in (1, tasks):
                with contextlib.redirect_stderr(io.StringIO()), kfp_local_run(workdir / "kfp-local"):
                    start = time.perf_counter()
                    chain(component, n)(config_json=config, parent_run_id=parent)
                    seconds[n] = time.perf_counter() - start
            slopes[name].append((seconds[tasks] - seconds[1]) / (tasks - 1))
            print(f"round {round_ + 1}: {name:6s} {slopes[name][-1]:.2f} s/task", flush=True)
        start = time.perf_counter()
        # as kfp.local and a pod start a component process: kfp's client is not imported
        env = {**ENV, "_KFP_RUNTIME": "true"}
        out = subprocess.run([sys.executable, "-c", PROBE, config, parent], env=env, **CAPTURE)
        walls.append(time.perf_counter() - start)
        probes.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return slopes, probes, walls


CAPTURE: dict[str, Any] = {"capture_output": True, "text": True, "check": True}


def python_start(rounds: int) -> float:
    walls = []
    for _ in range(max(rounds, 5)):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=ENV, **CAPTURE)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def step_imports() -> dict[str, list[str]]:
    """Each ``*_step`` of adaptflow.steps -> the modules its body imports (read with ``ast``)."""
    import ast

    import adaptflow.steps

    tree = ast.parse(Path(adaptflow.steps.__file__).read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_step"):
            mods = [n.module for n in ast.walk(node) if isinstance(n, ast.ImportFrom) and n.module]
            mods += [a.name for n in ast.walk(node) if isinstance(n, ast.Import) for a in n.names]
            found[node.name] = sorted(set(mods))
    return found


HEAVY = (
    "torch",
    "torchvision",
    "mlflow",
    "sqlalchemy",
    "onnx",
    "onnxruntime",
    "matplotlib",
    "sklearn",
    "scipy",
    "pandas",
)


def import_cost(modules: list[str]) -> tuple[float, list[str]]:
    """Seconds to import ``modules`` after adaptflow.steps (``-X importtime``: the top-level imports that
    follow it), and the heavy packages then loaded."""
    code = "import adaptflow.steps, sys\n" + "".join(f"import {m}\n" for m in modules)
    code += f"print(' '.join(h for h in {HEAVY!r} if h in sys.modules))"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=ENV, **CAPTURE)
    top = [re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S+)$", line) for line in out.stderr.splitlines()]
    names = [(m.group(2), int(m.group(1))) for m in top if m]
    after = [us for i, (name, us) in enumerate(names) if "adaptflow.steps" in [n for n, _ in names[:i]]]
    return sum(after) / 1e6, out.stdout.split()


# ------------------------------------------------------------------------------------ report
def tasks_section(
    slopes: dict[str, list[float]], probes: list[list[float]], walls: list[float], start: float, tasks: int
) -> list[str]:
    med = {name: statistics.median(v) for name, v in slopes.items()}
    parts = [statistics.median(p[i] for p in probes) for i in range(len(PROBE_PARTS))]
    wall = statistics.median(walls)
    lines = [
        f"### Per task, empty stage (kfp.local, chains of 1 and {tasks} tasks; slope)",
        "",
        "| empty component | s per task (median) | rounds |",
        "|---|---|---|",
        *[f"| {name} | {med[name]:.2f} | {', '.join(f'{v:.2f}' for v in slopes[name])} |" for name in slopes],
        "",
        f"Empty stage: {med['stage']:.2f} s per task, goal {GOALS['task']} s: {verdict(med['stage'], GOALS['task'])}.",
        "",
        "Where an empty stage's process spends it (one probe process doing what a component process does):",
        "",
        "| part | s (median) |",
        "|---|---|",
        f"| python start (`python -c pass`) | {start:.2f} |",
        *[f"| {name} | {value:.2f} |" for name, value in zip(PROBE_PARTS, parts, strict=True)],
        f"| interpreter exit and the rest (process wall {wall:.2f} - the above) | {wall - start - sum(parts):.2f} |",
        f"| kfp.local's own bookkeeping (empty stage's slope - process wall) | {med['stage'] - wall:.2f} |",
        "",
        "What each step imports at its top (`-X importtime` after `adaptflow.steps`; every step but "
        "keep_baseline also imports mlflow in its prologue, as above):",
        "",
        "| step | modules | s | heavy packages loaded |",
        "|---|---|---|---|",
    ]
    for step, modules in step_imports().items():
        seconds, heavy = import_cost(modules)
        lines.append(f"| {step} | {', '.join(modules) or '-'} | {seconds:.2f} | {', '.join(heavy) or '-'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="tasks,tracking,run", help="any of tasks, tracking, run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the tasks measurement (median)")
    parser.add_argument("--tasks", type=int, default=5, help="tasks in the long chain (per task = slope)")
    parser.add_argument("--epochs", type=int, default=None, help="finetune.epochs of the tracking part")
    parser.add_argument("--images", type=int, default=5000, help="images of the run part")
    parser.add_argument("--run-rounds", type=int, default=1, help="rounds of the run part (median)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override for the run part")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/adaptflow-overhead"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    if "tasks" in parts:
        slopes, probes, walls = measure_tasks(workdir / "tasks", args.rounds, args.tasks)
        lines += ["", *tasks_section(slopes, probes, walls, python_start(args.rounds), args.tasks)]
    if "tracking" in parts:
        lines += ["", *tracking_section(measure_tracking(workdir, args.epochs))]
    if "run" in parts:
        runs = [measure_run(workdir, args.images, args.sets, i) for i in range(args.run_rounds)]
        lines += ["", *run_section(runs, args.images, args.sets)]
    command = "python bench/overhead.py " + " ".join(sys.argv[1:])
    section = "\n".join([*provenance(HEADING, command.strip()), *lines]) + "\n"
    print(section)
    if not args.no_write:
        write_results(section, RESULTS, HEADING)


if __name__ == "__main__":
    main()
