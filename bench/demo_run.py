"""Benchmark of the main job: wall time of `adaptflow demo` (total and per stage) on a fresh workdir,
and backbone forward passes per image in the baseline stage (must be 1 on a cold cache, 0 warm).

    .venv/bin/python bench/demo_run.py [--workdir /tmp/adaptflow-bench]

Prints a Markdown block for bench/RESULTS.md. The first run includes demo data and source
pretraining; the second (--force) reuses them and the feature cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(workdir: Path, *extra: str) -> tuple[dict, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "adaptflow.cli", "demo", "--workdir", str(workdir), "--json", *extra],
        check=True,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
    )
    return json.loads(out.stdout), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/adaptflow-bench"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    cold, cold_s = run(args.workdir)
    warm, warm_s = run(args.workdir, "--force")
    seen = cold["dataset"]["counts"]["train"] + cold["dataset"]["counts"]["val"]
    lines = [
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}; date {time.strftime('%Y-%m-%d')}",
        "- command: `.venv/bin/python bench/demo_run.py`",
        "",
        "| run | total s | "
        + " | ".join(cold["stage_seconds"])
        + " | backbone forwards / image (baseline) |",
        "|---|---|" + "---|" * len(cold["stage_seconds"]) + "---|",
    ]
    for name, summary, seconds in (
        ("cold (data + pretrain + DAG)", cold, cold_s),
        ("warm (--force)", warm, warm_s),
    ):
        forwards = summary["baseline"]["cost"]["backbone_forward_images"] / seen
        stages = " | ".join(f"{summary['stage_seconds'].get(s, 0):.1f}" for s in cold["stage_seconds"])
        lines.append(f"| {name} | {seconds:.1f} | {stages} | {forwards:.2f} |")
    lines.append("")
    lines.append(
        f"Baseline test accuracy {cold['baseline']['metrics']['accuracy']:.4f}; "
        f"fine-tune ran: {cold['finetune']['ran']} ({(cold['finetune']['metrics'] or {}).get('accuracy')}); "
        f"winner {cold['winner']}; ONNX max |diff| {cold['onnx']['max_abs_diff']:.1e}; "
        f"p50 {cold['onnx']['latency_ms_p50']:.2f} ms."
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
