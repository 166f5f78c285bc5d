"""Fine-tuning throughput under a one-CPU quota: torch's default threads vs adaptflow's sizing vs 1 by hand.

Each job trains ResNet-18 at 32 px, batch 64 (forward, backward, AdamW) on random tensors for
``--steps`` steps after 3 warm-up steps, in its own process placed in a cgroup whose CPU quota is
``--quota`` CPUs (cgroup v1 ``cpu.cfs_quota_us`` or v2 ``cpu.max``; needs root). The three settings
are interleaved, round after round, and the median images/s of ``--rounds`` rounds is reported:

- ``torch default``: torch's own pool size (the host's cores, what adaptflow did before);
- ``adaptflow``: ``adaptflow.cpus.configure_threads()``, which reads the quota;
- ``1 by hand``: ``torch.set_num_threads(1)``.

Usage: ``python bench/threads.py [--quota 1] [--rounds 5] [--steps 20] [--no-write]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from evidence import provenance, publish

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Threads under a CPU quota (issue 12)"

JOB = """
import json, sys, time, torch, torchvision
mode, steps = sys.argv[1], int(sys.argv[2])
if mode == "adaptflow":
    from adaptflow.cpus import configure_threads
    configure_threads()
elif mode == "one":
    torch.set_num_threads(1)
model = torchvision.models.resnet18(num_classes=10)
opt = torch.optim.AdamW(model.parameters())
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
loss_fn = torch.nn.CrossEntropyLoss()
def step():
    opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
for _ in range(3):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"threads": torch.get_num_threads(), "images_per_second": 64 * steps / (time.perf_counter() - start)}))
"""

MODES = {"torch default": "default", "adaptflow": "adaptflow", "1 by hand": "one"}


@contextlib.contextmanager
def quota_cgroup(cpus: float) -> Iterator[Path]:
    """A cgroup limited to ``cpus`` CPUs; yields the file a pid is written to, to join it."""
    period = 100_000
    v2, v1 = Path("/sys/fs/cgroup/cgroup.controllers"), Path("/sys/fs/cgroup/cpu")
    if v2.exists():
        folder = Path("/sys/fs/cgroup/adaptflow-bench")
        folder.mkdir(exist_ok=True)
        (folder / "cpu.max").write_text(f"{int(cpus * period)} {period}")
    elif v1.is_dir():
        folder = v1 / "adaptflow-bench"
        folder.mkdir(exist_ok=True)
        (folder / "cpu.cfs_period_us").write_text(str(period))
        (folder / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
    else:
        raise SystemExit("no cgroup CPU controller found")
    try:
        yield folder / "cgroup.procs"
    finally:
        with contextlib.suppress(OSError):
            folder.rmdir()


def run_job(procs: Path, mode: str, steps: int) -> dict[str, float]:
    shell = f'echo $$ > {procs} && exec "$0" -c "$1" {mode} {steps}'
    out = subprocess.run(
        ["sh", "-c", shell, sys.executable, JOB], capture_output=True, text=True, check=True, timeout=900
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quota", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in MODES}
    threads: dict[str, int] = {}
    with quota_cgroup(args.quota) as procs:
        for round_ in range(args.rounds):
            for name, mode in MODES.items():
                result = run_job(procs, mode, args.steps)
                rates[name].append(result["images_per_second"])
                threads[name] = int(result["threads"])
                print(f"round {round_ + 1}: {name:14s} {result['images_per_second']:7.1f} img/s", flush=True)
    by_hand = statistics.median(rates["1 by hand"])
    command = "python bench/threads.py " + " ".join(sys.argv[1:])
    lines = [
        *provenance(HEADING, command.strip()),
        f"- setup: ResNet-18, 32 px, batch 64, AdamW, random tensors; {args.steps} timed steps after 3 warm-up "
        f"steps; each job in a cgroup limited to {args.quota:g} CPU(s) of this machine's {os.cpu_count()}; "
        f"settings interleaved, median of {args.rounds} rounds",
        "",
        "| threads setting | torch threads | images/s (median) | rounds | ratio to 1 by hand |",
        "|---|---|---|---|---|",
    ]
    for name in MODES:
        median = statistics.median(rates[name])
        spread = ", ".join(f"{r:.0f}" for r in rates[name])
        lines.append(f"| {name} | {threads[name]} | {median:.1f} | {spread} | {median / by_hand:.2f} |")
    publish(lines, HEADING, write=not args.no_write, path=RESULTS)


if __name__ == "__main__":
    main()
