"""Concurrent fine-tuning jobs on one machine: aggregate images/s with 1, 2 and 4 jobs (issue 12).

Each job is a process running adaptflow's own training step (``adaptflow.training.step.train_step``:
ResNet-18 at 32 px, batch 64, AdamW, cross-entropy, random tensors) with torch's threads sized by
``adaptflow.cpus.configure_threads()``, as a stage would. Every job warms up (3 steps) and says so;
when all are ready they are told to start together, each counts the steps it finishes in
``--seconds`` and reports, and each keeps training until every job has reported, so the timed
windows overlap from start to end. Two environments are compared:

- ``torch/libgomp default env``: ``GOMP_SPINCOUNT`` and ``OMP_WAIT_POLICY`` removed;
- ``adaptflow``: that environment plus ``adaptflow.cpus.openmp_env`` (a bounded OpenMP spin).

Job counts and environments are interleaved within each round; medians of ``--rounds`` rounds are
reported, with the aggregate divided by one job alone in the same environment (issue 12's goal:
at least 0.7 with 4 jobs) and adaptflow's job alone divided by the default's (the spin's cost).

Usage: ``python bench/contention.py [--jobs 1,2,4] [--rounds 5] [--seconds 10] [--no-write]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from evidence import provenance, write_results

from adaptflow.cpus import OPENMP_USER_KEYS, cpu_budget, openmp_env

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Concurrent jobs on one machine (issue 12, contention)"
GOAL = 0.7  # issue 12: aggregate with 4 jobs at least this times one job alone

JOB = """
import json, select, sys, time
import torch, torchvision
from adaptflow.cpus import configure_threads
from adaptflow.training.step import train_step
seconds = float(sys.argv[1])
threads = configure_threads()
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10)
opt = torch.optim.AdamW(model.parameters())
loss_fn = torch.nn.CrossEntropyLoss()
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
cpu = torch.device("cpu")
def step():
    train_step(model, x, y, opt, loss_fn, cpu)
for _ in range(3):
    step()
print("ready", flush=True)
sys.stdin.readline()
start, steps = time.perf_counter(), 0
while True:
    step()
    steps += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
        break
print(json.dumps({"threads": threads, "steps": steps, "images_per_second": 64 * steps / elapsed}), flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    step()
"""


def environments() -> dict[str, dict[str, str]]:
    """The two settings' environments; a user's own OpenMP settings are dropped from both."""
    base = {k: v for k, v in os.environ.items() if k not in OPENMP_USER_KEYS}
    return {"torch/libgomp default env": base, "adaptflow": {**base, **openmp_env(base)}}


def run_jobs(count: int, env: dict[str, str], seconds: float) -> list[dict[str, float]]:
    """Starts ``count`` jobs, times them together, and returns each one's result."""
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", JOB, str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(count)
    ]
    try:
        for job in jobs:
            if job.stdout is None or job.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a job failed before timing (exit {job.poll()})")
        for job in jobs:  # one write each, back to back: the windows start within milliseconds
            assert job.stdin is not None
            job.stdin.write("go\n")
            job.stdin.flush()
        results = []
        for job in jobs:
            line = job.stdout.readline() if job.stdout else ""
            if not line:
                raise RuntimeError(f"a job failed while timed (exit {job.poll()})")
            results.append(json.loads(line))
        for job in jobs:  # closing stdin is the stop: every window has ended by now
            assert job.stdin is not None
            job.stdin.close()
        for job in jobs:
            job.wait(timeout=300)
        return results
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", default="1,2,4", help="concurrent job counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed window of each job")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = parser.parse_args()
    counts = [int(c) for c in args.jobs.split(",")]
    envs = environments()
    # (setting, jobs) -> each round's aggregate images/s
    totals: dict[tuple[str, int], list[float]] = {(name, n): [] for name in envs for n in counts}
    threads: dict[str, int] = {}
    for round_ in range(args.rounds):
        for n in counts:
            # alternate which setting goes first, so a drift in the machine's load falls on both
            names = list(envs) if round_ % 2 == 0 else list(reversed(envs))
            for name in names:
                results = run_jobs(n, envs[name], args.seconds)
                total = sum(r["images_per_second"] for r in results)
                totals[name, n].append(total)
                threads[name] = int(results[0]["threads"])
                steps = min(int(r["steps"]) for r in results)
                print(
                    f"round {round_ + 1}: {name:26s} {n} job(s) {total:7.1f} img/s aggregate "
                    f"(fewest steps in a job: {steps})",
                    flush=True,
                )
    section = markdown(args, counts, envs, totals, threads)
    print(section)
    if not args.no_write:
        write_results(section, RESULTS, HEADING)


def markdown(
    args: argparse.Namespace,
    counts: list[int],
    envs: dict[str, dict[str, str]],
    totals: dict[tuple[str, int], list[float]],
    threads: dict[str, int],
) -> str:
    medians = {key: statistics.median(values) for key, values in totals.items()}
    added = " ".join(f"{k}={v}" for k, v in openmp_env({}).items())
    command = "python bench/contention.py " + " ".join(sys.argv[1:])
    lines = [
        *provenance(HEADING, command.strip()),
        f"- setup: each job is a process training ResNet-18, 32 px, batch 64, AdamW on random tensors with "
        f"adaptflow.training.step.train_step; torch threads from adaptflow.cpus.configure_threads() "
        f"(CPU budget {cpu_budget()}); 3 warm-up steps, then all jobs timed together for "
        f"{args.seconds:g} s each, windows overlapping throughout; {os.cpu_count()} CPUs visible",
        f"- environments: default = GOMP_SPINCOUNT and OMP_WAIT_POLICY unset; adaptflow = {added} "
        f"(adaptflow.cpus.openmp_env); interleaved, median of {args.rounds} rounds",
        "",
        "| environment | jobs | torch threads per job | per-job images/s (median) "
        "| aggregate images/s (median) | aggregate per round | aggregate ÷ one job alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in envs:
        alone = medians.get((name, 1))
        for n in counts:
            median = medians[name, n]
            spread = ", ".join(f"{t:.0f}" for t in totals[name, n])
            ratio = "-" if alone is None else f"{median / alone:.2f}"
            lines.append(
                f"| {name} | {n} | {threads[name]} | {median / n:.1f} | {median:.1f} | {spread} | {ratio} |"
            )
    default, ours = list(envs)
    lines.append("")
    if (default, 1) in medians:
        cost = medians[ours, 1] / medians[default, 1]
        lines.append(
            f"- adaptflow's job alone ÷ the default's alone: {cost:.2f} (below 1: what the bounded spin costs)"
        )
    if (ours, 1) in medians and (ours, 4) in medians:
        shared = medians[ours, 4] / medians[ours, 1]
        verdict = "met" if shared >= GOAL else "not met"
        lines.append(f"- goal, adaptflow with 4 jobs ≥ {GOAL}× one job alone: {shared:.2f}, {verdict}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
