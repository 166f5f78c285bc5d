"""Ingest at scale (issue 14, item 4): a synthetic manifest of ``--rows`` images, ingested cold, then
again after 1% new rows, with the verdict cache. Prints a Markdown section; writes nothing else.

Every row names its own file: a 28x28 grayscale PNG (MNIST-sized) whose pixels are a fixed noise
pattern with the row number written into its first bytes, so all contents differ and none is a
duplicate. The PNGs are encoded here with zlib (PIL is too slow to write a million) and decode
through PIL like any other file. Everything lives in a temporary folder that is deleted at the end.

    .venv/bin/python bench/ingest_scale.py --rows 10000
    .venv/bin/python bench/ingest_scale.py            # 1,000,000 rows; about 4 GB of small files
    .venv/bin/python bench/ingest_scale.py --sha256   # the manifest names each file's sha256
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SIDE = 28  # pixels a side, unless --side says otherwise
CLASSES = 10
PER_FOLDER = 1000

RUN = """
import json, resource, sys, time
from adaptflow.config import IngestConfig
from adaptflow.data.ingest import ingest
from adaptflow.data.verdicts import VerdictCache
cache = VerdictCache(sys.argv[2])
start = time.perf_counter()
snapshot = ingest(sys.argv[1], IngestConfig(), verdicts=cache)
snapshot.save(sys.argv[3])
wall = time.perf_counter() - start
print(json.dumps({
    "wall_s": wall, "entries": sum(snapshot.counts.values()),
    "quarantined": len(snapshot.quarantined), "hits": cache.hits, "checked": cache.checked,
    "fingerprint": snapshot.fingerprint,
    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "workers_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(row: int, noise: bytes, side: int = SIDE) -> bytes:
    """A valid 8-bit grayscale PNG whose first pixels hold ``row``: distinct content per row."""
    pixels = bytearray(noise)
    pixels[:8] = row.to_bytes(8, "big")
    raw = b"".join(b"\x00" + bytes(pixels[y * side : (y + 1) * side]) for y in range(side))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 1))
        + _chunk(b"IEND", b"")
    )


def relative(row: int) -> str:
    return f"img/{row // PER_FOLDER:05d}/{row:07d}.png"


def write_files(args: tuple[str, int, int, int]) -> list[str]:
    """Writes rows [start, stop); returns their sha256s."""
    root, start, stop, side = args
    noise = bytes((i * 97 + 31) % 251 for i in range(side * side))
    digests = []
    for row in range(start, stop):
        path = os.path.join(root, relative(row))
        if row % PER_FOLDER == 0 or row == start:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        data = png(row, noise, side)
        with open(path, "wb") as handle:
            handle.write(data)
        digests.append(hashlib.sha256(data).hexdigest())
    return digests


def make_rows(root: Path, start: int, stop: int, workers: int, sha256: bool, side: int = SIDE) -> float:
    """Writes the files of rows [start, stop) and appends them to the manifest (with a ``sha256``
    column if asked); returns seconds."""
    began = time.perf_counter()
    step = max(PER_FOLDER, (stop - start) // (workers * 8) // PER_FOLDER * PER_FOLDER)
    ranges = [(str(root), a, min(a + step, stop), side) for a in range(start, stop, step)]
    with ProcessPoolExecutor(workers) as pool:
        digests = [d for part in pool.map(write_files, ranges) for d in part]
    with open(root / "manifest.csv", "a") as handle:
        if start == 0:
            handle.write("uri,label,sha256\n" if sha256 else "uri,label\n")
        handle.writelines(
            f"{relative(r)},class-{r % CLASSES}" + (f",{d}\n" if sha256 else "\n")
            for r, d in zip(range(start, stop), digests, strict=True)
        )
    return time.perf_counter() - began


def ingest_once(root: Path, cache: Path, out: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(root / "manifest.csv"), str(cache), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-4000:])
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown CPU",
    )
    from adaptflow.cpus import cpu_budget

    return f"{platform.system()} {platform.machine()}, {model}, {cpu_budget()} CPUs usable, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--new", type=float, default=0.01, help="share of new rows for the second run")
    parser.add_argument("--tmp", default=None, help="where the temporary folder goes (local disk)")
    parser.add_argument("--side", type=int, default=SIDE, help="image side in pixels")
    parser.add_argument("--reruns", type=int, default=3, help="incremental runs (the median counts)")
    parser.add_argument(
        "--sha256", action="store_true", help="the manifest names each file's sha256 (the content address)"
    )
    args = parser.parse_args(argv)
    new_rows = max(1, round(args.rows * args.new))
    workers = max(1, os.cpu_count() or 1)
    root = Path(tempfile.mkdtemp(prefix="adaptflow-ingest-scale-", dir=args.tmp))
    try:
        made = make_rows(root, 0, args.rows, workers, args.sha256, args.side)
        cold = ingest_once(root, root / "cache", root / "snap-cold")
        grown = make_rows(root, args.rows, args.rows + new_rows, workers, args.sha256, args.side)
        reruns = []
        for k in range(args.reruns):  # each from the cold run's cache: the same work every time
            shutil.copytree(root / "cache", root / f"cache-{k}")
            reruns.append(ingest_once(root, root / f"cache-{k}", root / f"snap-warm-{k}"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    warm = sorted(reruns, key=lambda r: r["wall_s"])[len(reruns) // 2]  # the median
    ratio = warm["wall_s"] / cold["wall_s"]
    command = "python bench/ingest_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    met = ratio <= 0.05 and warm["checked"] == new_rows
    print(f"""## Ingest at scale: {args.rows:,} rows cold, then {new_rows:,} new rows ({args.new:.0%})

- machine: {machine()}
- date: {datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
- command: `{command}`
- data: a CSV manifest of {args.rows:,} rows{" naming each file's sha256" if args.sha256 else ""}, each its own {args.side}x{args.side} grayscale PNG on local disk \
(written in {made:.0f} s; {new_rows:,} more in {grown:.1f} s)

| run | rows | files checked | verdicts reused | wall | peak RSS (ingest) | peak RSS (a worker) |
|---|---|---|---|---|---|---|
| cold | {args.rows:,} | {cold["checked"]:,.0f} | {cold["hits"]:,.0f} | {cold["wall_s"]:.1f} s | \
{cold["rss_mb"]:.0f} MB | {cold["workers_rss_mb"]:.0f} MB |
| +{args.new:.0%} new (median of {len(reruns)}) | {args.rows + new_rows:,} | {warm["checked"]:,.0f} | \
{warm["hits"]:,.0f} | {warm["wall_s"]:.2f} s | {warm["rss_mb"]:.0f} MB | {warm["workers_rss_mb"]:.0f} MB |

Incremental runs: {", ".join(f"{r['wall_s']:.2f} s" for r in reruns)}, each from the cold run's verdict cache.
Incremental (median) / cold wall time: {ratio:.1%} (goal: at most 5%, checking only the new rows): \
**{"met" if met else "not met"}**. Snapshot entries: {cold["entries"]:,.0f} then {warm["entries"]:,.0f}; \
quarantined: {cold["quarantined"]:,.0f} then {warm["quarantined"]:,.0f}. Wall time covers listing, \
checking, assembling and saving the Parquet snapshot.""")


if __name__ == "__main__":
    main()
