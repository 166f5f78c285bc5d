"""Incremental ingest (issue 14, item 4): only new or changed files are decoded, the snapshot is the
one a cold ingest gives, and snapshots are Parquet that load lazily (old snapshot.json still loads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

import adaptflow.data.listing as listing
import adaptflow.data.manifests as manifests
import adaptflow.data.presence as presence
import adaptflow.data.verdicts as verdicts_module
from adaptflow.config import IngestConfig
from adaptflow.contracts import Snapshot
from adaptflow.data.ingest import ingest
from adaptflow.data.snapshot_store import Rows
from adaptflow.data.verdicts import VerdictCache
from adaptflow.errors import DataError

CLASSES = ("cat", "dog", "eel")


def _image(path: Path, shade: int, size: int = 12) -> None:
    # BMP: uncompressed, so another shade is the same number of bytes (a same-size in-place edit)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (shade, (shade * 7) % 256, (shade * 13) % 256)).save(path)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for c, name in enumerate(CLASSES):
        for i in range(10):
            _image(root / name / f"{i:02d}.bmp", 20 * i + c + 1)
    return root


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts real decode calls (few files are checked in this process, see POOL_THRESHOLD)."""
    calls: list[int] = []
    real = verdicts_module.decode_image

    def counting(data: bytes, *args: object, **kwargs: object) -> Image.Image:
        calls.append(len(data))
        return real(data, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(verdicts_module, "decode_image", counting)
    return calls


def _same_snapshot(a: Snapshot, b: Snapshot) -> None:
    assert a.fingerprint == b.fingerprint
    assert tuple(a.entries) == tuple(b.entries)
    assert tuple(a.quarantined) == tuple(b.quarantined)
    assert (a.counts, a.class_counts, a.class_names) == (b.counts, b.class_counts, b.class_names)


def test_a_second_ingest_decodes_only_new_and_changed_files(
    data: Path, tmp_path: Path, decodes: list[int]
) -> None:
    cache = VerdictCache(str(tmp_path / "cache"))
    cold = ingest(str(data), IngestConfig(), verdicts=cache)
    assert cache.checked == 30 and cache.hits == 0 and len(decodes) == 30

    _image(data / "cat" / "new-1.bmp", 201)
    _image(data / "eel" / "new-2.bmp", 202)
    (data / "dog" / "03.bmp").unlink()
    changed = data / "dog" / "04.bmp"
    _image(changed, 203, size=14)  # another size and content
    (data / "eel" / "05.bmp").write_bytes(b"not an image any more")
    decodes.clear()
    warm = ingest(str(data), IngestConfig(), verdicts=cache)

    expected = {str(p.resolve()) for p in (data / "cat/new-1.bmp", data / "eel/new-2.bmp", changed)}
    expected.add(str((data / "eel/05.bmp").resolve()))
    assert set(cache.checked_uris) == expected
    assert cache.hits == 30 - 3  # one removed, two changed
    assert len(decodes) == 4  # the new, the edited and the broken file: nothing else is opened
    assert warm.fingerprint != cold.fingerprint
    assert any(q.uri.endswith("05.bmp") for q in warm.quarantined)
    _same_snapshot(warm, ingest(str(data), IngestConfig()))  # the same as a cold ingest


def test_a_same_size_edit_with_a_new_mtime_is_checked_again(data: Path, tmp_path: Path) -> None:
    cache = VerdictCache(str(tmp_path / "cache"))
    before = ingest(str(data), IngestConfig(), verdicts=cache)
    target = data / "cat" / "02.bmp"
    size, mtime = target.stat().st_size, target.stat().st_mtime_ns
    _image(target, 250)
    os.utime(target, ns=(mtime + 2_000_000_000, mtime + 2_000_000_000))
    assert target.stat().st_size == size

    after = ingest(str(data), IngestConfig(), verdicts=cache)
    assert cache.checked_uris == [str(target.resolve())]
    old = {e.uri: e.sha256 for e in before.entries}
    new = {e.uri: e.sha256 for e in after.entries}
    assert new[str(target.resolve())] != old[str(target.resolve())]
    _same_snapshot(after, ingest(str(data), IngestConfig()))


def test_a_corrupt_verdict_cache_is_a_miss_not_a_crash(data: Path, tmp_path: Path) -> None:
    cache = VerdictCache(str(tmp_path / "cache"))
    cold = ingest(str(data), IngestConfig(), verdicts=cache)
    location = Path(cache.location(str(data), IngestConfig(), None))
    assert location.exists()
    location.write_bytes(b"PAR1 torn half-written file")
    again = ingest(str(data), IngestConfig(), verdicts=cache)
    assert cache.hits == 0 and cache.checked == 30
    _same_snapshot(again, cold)
    ingest(str(data), IngestConfig(), verdicts=cache)  # and the rewritten cache is whole again
    assert cache.hits == 30 and cache.checked == 0


def test_other_check_settings_do_not_reuse_verdicts(data: Path, tmp_path: Path) -> None:
    _image(data / "cat" / "large.bmp", 99, size=14)
    cache = VerdictCache(str(tmp_path / "cache"))
    assert len(ingest(str(data), IngestConfig(), verdicts=cache).entries) == 31
    small = ingest(str(data), IngestConfig(max_image_pixels=150), verdicts=cache)
    assert cache.hits == 0  # a limit on pixels changes verdicts: the cache is keyed by it
    assert [q.uri for q in small.quarantined] == [str((data / "cat" / "large.bmp").resolve())]


def test_worker_processes_give_the_same_snapshot(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verdicts_module, "POOL_THRESHOLD", 1)
    monkeypatch.setattr(verdicts_module, "CHUNK_ROWS", 4)
    monkeypatch.setattr("adaptflow.data.ingest.cpu_budget", lambda: type("B", (), {"cpus": 2})())
    pooled = ingest(str(data), IngestConfig(), verdicts=VerdictCache(str(tmp_path / "cache")))
    monkeypatch.setattr(verdicts_module, "POOL_THRESHOLD", 10**9)
    _same_snapshot(pooled, ingest(str(data), IngestConfig()))


def test_a_manifest_sha256_column_keys_the_cache_and_is_confirmed(data: Path, tmp_path: Path) -> None:
    cold = ingest(str(data), IngestConfig())
    lines = [json.dumps({"uri": e.uri, "label": e.label, "sha256": e.sha256}) for e in cold.entries]
    wrong = json.loads(lines[0])
    lines[0] = json.dumps(wrong | {"sha256": "0" * 64})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    cfg = IngestConfig(allowed_roots=(str(data.resolve()),))
    cache = VerdictCache(str(tmp_path / "cache"))
    first = ingest(str(manifest), cfg, verdicts=cache)
    assert [q.uri for q in first.quarantined] == [wrong["uri"]]
    assert "differs from the manifest's" in first.quarantined[0].reason
    ingest(str(manifest), cfg, verdicts=cache)
    # a mismatch is never cached (these bytes are not the content the stamp names): checked again
    assert cache.checked == 1 and cache.hits == 30 - 1


def test_snapshot_is_parquet_and_a_split_reads_only_its_rows(data: Path, tmp_path: Path) -> None:
    snap = ingest(str(data), IngestConfig())
    folder = tmp_path / "snap"
    snap.save(folder)
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".parquet", ".parquet"]
    assert "entries" not in json.loads((folder / Snapshot.FILE).read_text())
    loaded = Snapshot.load(folder)
    assert isinstance(loaded.entries, Rows)
    for split in ("train", "val", "test"):
        rows = loaded.split(split)
        assert rows and all(e.split == split for e in rows)
        assert rows == snap.split(split)  # same rows, same order
        assert len(rows) == snap.counts[split]
    assert loaded.entries._items is None  # reading splits never loaded every entry
    _same_snapshot(loaded, snap)
    snap.save(folder)  # saving again replaces the files, it does not pile them up
    assert len(list(folder.glob("*.parquet"))) == 2


def test_an_old_snapshot_json_still_loads(data: Path, tmp_path: Path) -> None:
    snap = ingest(str(data), IngestConfig())
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / Snapshot.FILE).write_text(snap.model_dump_json(indent=2))  # the single-document format
    assert "entries" in json.loads((folder / Snapshot.FILE).read_text())
    old = Snapshot.load(folder)
    _same_snapshot(old, snap)
    assert old.split("val") == snap.split("val")


# --- the listing: Arrow columns, a batch at a time, with the checks that name a refusal ----------


def _csv_manifest(data: Path, extra: list[tuple[str, str]]) -> Path:
    rows = [(f"{p.parent.name}/{p.name}", p.parent.name) for p in sorted(data.glob("*/*.bmp"))]
    manifest = data / "manifest.csv"
    manifest.write_text("uri,label\n" + "".join(f"{u},{label}\n" for u, label in rows + extra))
    return manifest


def test_small_batches_io_threads_and_the_python_reader_list_the_same(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (data / "cat" / "gone.bmp").touch()
    manifest = _csv_manifest(data, [("cat/missing.bmp", "cat"), ("dog/../dog/01.bmp", "dog")])
    (data / "cat" / "gone.bmp").unlink()  # a row whose file went: refused with its row number
    row = manifest.read_text().splitlines().index("cat/gone.bmp,cat")
    reference = ingest(str(manifest), IngestConfig())
    reasons = {Path(q.uri).name: q.reason for q in reference.quarantined}
    assert reasons["gone.bmp"] == f"manifest.csv row {row}: {data}/cat/gone.bmp: does not exist"
    assert reasons["01.bmp"].startswith("duplicate content of")
    assert len(reference.entries) == 30

    monkeypatch.setattr(listing, "BATCH_ROWS", 4)  # rows, stats and refusals across batch boundaries
    monkeypatch.setattr(presence, "STAT_CHUNK", 3)
    monkeypatch.setattr(presence, "SLOW_STAT_S", 0.0)  # every stat "waits on storage": I/O threads
    _same_snapshot(ingest(str(manifest), IngestConfig()), reference)
    monkeypatch.setattr(presence, "SLOW_STAT_S", 1.0)  # fast local stats: in worker processes
    monkeypatch.setattr(presence, "PROCESS_MIN_CHUNKS", 1)
    used: list[int] = []
    real_map = presence.StatProcesses.map

    def counted(self: presence.StatProcesses, spans: list[list[str]]) -> object:
        used.append(self.workers)
        return real_map(self, spans)

    monkeypatch.setattr(presence.StatProcesses, "map", counted)
    monkeypatch.setattr(listing, "cpu_budget", lambda: type("Budget", (), {"cpus": 2})())
    _same_snapshot(ingest(str(manifest), IngestConfig()), reference)
    assert used and all(workers == 2 for workers in used)
    monkeypatch.setattr(manifests, "read_with_arrow", lambda path: None)  # what pyarrow refuses
    _same_snapshot(ingest(str(manifest), IngestConfig()), reference)


def test_a_manifest_pyarrow_cannot_read_is_read_as_before(data: Path) -> None:
    number = {name: n for n, name in enumerate(CLASSES, start=1)}
    files = sorted(data.glob("*/*.bmp"))
    as_text, as_numbers = data / "text.jsonl", data / "numbers.jsonl"
    extra = {"note": [1, 2]}  # a field pyarrow ignores
    rows = [{"uri": f"{p.parent.name}/{p.name}", "label": number[p.parent.name]} for p in files]
    as_text.write_text("".join(json.dumps(r | extra | {"label": str(r["label"])}) + "\n" for r in rows))
    as_numbers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert manifests.read_with_arrow(as_text) is not None
    assert manifests.read_with_arrow(as_numbers) is None  # labels that are JSON numbers
    read_by_python = ingest(str(as_numbers), IngestConfig())
    assert read_by_python.class_names == ("1", "2", "3")  # str(1), as it always was
    _same_snapshot(read_by_python, ingest(str(as_text), IngestConfig()))

    ragged = data / "ragged.csv"
    ragged.write_text("uri,label\ncat/00.bmp,cat\ncat/01.bmp\n")  # a row without its label column
    assert manifests.read_with_arrow(ragged) is None
    with pytest.raises(DataError, match="row 2 needs a 'uri'"):
        ingest(str(ragged), IngestConfig())
    late = data / "late.csv"
    late.write_text("uri,label\n" + "cat/00.bmp,cat\n" * 9 + "cat/01.bmp,\n")
    with pytest.raises(DataError, match="row 10 needs a 'uri'"):  # read by pyarrow: the same message
        ingest(str(late), IngestConfig())


def test_a_folder_symlinked_out_of_the_root_is_refused_on_the_fast_path(data: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _image(outside / "secret.bmp", 250)
    manifest = _csv_manifest(data, [("linked/secret.bmp", "cat"), ("linked/../cat/00.bmp", "cat")])
    (data / "linked").symlink_to(outside, target_is_directory=True)
    row = manifest.read_text().splitlines().index("linked/secret.bmp,cat")
    snap = ingest(str(manifest), IngestConfig())
    refused = {q.uri: q.reason for q in snap.quarantined}
    assert refused[f"{data}/linked/secret.bmp"].startswith(
        f"manifest.csv row {row}: {data}/linked/secret.bmp (resolves to {outside}/secret.bmp) is outside"
    )
    # through the link and back up: the kernel lands outside too (the link's parent is not its target's)
    assert "is outside the data root" in refused[f"{data}/linked/../cat/00.bmp"]
    assert len(snap.entries) == 30 and all(e.uri.startswith(str(data.resolve())) for e in snap.entries)

    (data / "linked").unlink()
    (data / "cat" / "more.bmp").symlink_to(outside, target_is_directory=True)
    snap = ingest(str(data), IngestConfig())  # the ImageFolder walk does not follow it, as rglob did not
    assert not any("secret" in e.uri for e in snap.entries)
    assert "is outside the data root" in {q.uri: q.reason for q in snap.quarantined}[f"{data}/cat/more.bmp"]


def test_mlflow_gets_the_snapshot_json_and_the_parquet_files_it_names(data: Path, tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from adaptflow.data.ingest import write_quarantine_report
    from adaptflow.stage_logs import log_ingest
    from adaptflow.tracking import TrackingContext, embedded_tracking_uri, ensure_experiment

    snap = ingest(str(data), IngestConfig())
    out = tmp_path / "out"
    snap.save(out)
    write_quarantine_report(snap, out)
    uri = embedded_tracking_uri(tmp_path)
    experiment = ensure_experiment(uri, "t", tmp_path)
    mlflow.set_tracking_uri(uri)
    parent = MlflowClient(uri).create_run(experiment).info.run_id
    with mlflow.start_run(experiment_id=experiment, parent_run_id=parent) as run:
        log_ingest(TrackingContext(uri, experiment, parent), snap, str(data), out, True, "new data")
    logged = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert logged == {p.name for p in out.iterdir()}  # snapshot.json, quarantine.csv, 2 Parquet files
    fetched = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "dl"))
    _same_snapshot(Snapshot.load(fetched), snap)  # the logged snapshot loads on its own


@pytest.mark.parametrize("kind", ["sha256", "tied prefixes", "not hex"])
def test_the_snapshot_fingerprint_is_the_sorted_pairs_digest(kind: str) -> None:
    """The Arrow fingerprint (a numeric sort of sha256 prefixes, or a string sort where that cannot
    decide) equals ``ingest.fingerprint`` over the same (sha256, label) pairs."""
    import hashlib

    import pyarrow as pa

    from adaptflow.data.assemble import SnapshotTables
    from adaptflow.data.ingest import fingerprint

    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5000)]
    if kind == "tied prefixes":
        shas[7] = shas[3][:16] + "0" * 48  # the same first 16 digits as another entry
    elif kind == "not hex":
        shas[11] = "Z" * 64
    labels = [f"class-{i % 7}" for i in range(len(shas))]
    entries = pa.table({"sha256": shas, "label": labels, "uri": [f"/d/{i}.png" for i in range(len(shas))]})
    tables = SnapshotTables(entries=entries, quarantined=pa.table({"uri": [], "reason": []}))
    assert tables.fingerprint() == fingerprint(zip(shas, labels, strict=True))


def test_entries_are_in_label_then_uri_order_whatever_the_manifest_order() -> None:
    import random

    import pyarrow as pa

    from adaptflow.data.assemble import _label_uri_order

    rows = [
        (f"/d/{i % 13}/{i:05d}.png", ["zèbre", "ant", "Élan", "bee", "ant b"][i % 5]) for i in range(3000)
    ]
    random.Random(0).shuffle(rows)
    entries = pa.table({"uri": [u for u, _ in rows], "label": [label for _, label in rows]})
    ordered = entries.take(_label_uri_order(entries))
    assert ordered.equals(entries.sort_by([("label", "ascending"), ("uri", "ascending")]))
    assert len(_label_uri_order(entries.slice(0, 0))) == 0


def test_duplicates_are_found_by_the_whole_sha256_not_its_prefix() -> None:
    import pyarrow as pa

    from adaptflow.data.assemble import assemble

    base = "ab" * 8  # 16 digits several files share
    shas = [base + "0" * 48, base + "1" * 48, base + "1" * 48, "cd" * 32, "ef" * 32, "ef" * 32]
    labels = ["cat", "cat", "cat", "dog", "dog", "cat"]
    n = len(shas)
    checked = pa.table(
        {
            "uri": [f"/d/{i}.png" for i in range(n)],
            "label": labels,
            "stamp": ["1:1"] * n,
            "etag": pa.nulls(n, pa.string()),
            "sha256": shas,
            "width": [8] * n,
            "height": [8] * n,
            "bucket": [0.5] * n,
            "reason": pa.nulls(n, pa.string()),
        }
    )
    parts = assemble(
        checked,
        pa.table({"uri": pa.array([], pa.string()), "reason": pa.array([], pa.string())}),
        IngestConfig(),
    )
    assert sorted(parts.entries["uri"].to_pylist()) == ["/d/0.png", "/d/1.png", "/d/3.png"]
    reasons = dict(
        zip(parts.quarantined["uri"].to_pylist(), parts.quarantined["reason"].to_pylist(), strict=True)
    )
    assert reasons["/d/2.png"] == "duplicate content of /d/1.png"
    assert reasons["/d/4.png"] == reasons["/d/5.png"] == "same content labelled cat and dog"
    assert len(reasons) == 3


@pytest.mark.parametrize("shape", ["grown", "inserted", "reordered", "shorter", "empty cache"])
def test_cached_verdicts_match_a_lookup_by_uri_and_stamp(shape: str) -> None:
    """Positional matching where listing and cache agree, hash lookup elsewhere: the same hits as a
    plain dictionary from (uri) to the first cached (stamp, verdict)."""
    import random

    import pyarrow as pa

    from adaptflow.data.verdicts import cached_verdicts

    uris = [f"/d/{i:04d}.png" for i in range(400)]
    cache_rows = [(u, f"{i}:1", f"sha-{i}") for i, u in enumerate(uris)]
    cache_rows.append((uris[5], "other:stamp", "sha-dup"))  # a URI cached twice: the first counts
    listed = [(u, f"{i}:1") for i, u in enumerate(uris)]
    listed[7] = (uris[7], "7:2")  # changed since
    listed[9] = (uris[9], None)  # no stamp: never a hit
    if shape == "grown":
        listed += [(f"/d/new-{i}.png", "1:1") for i in range(20)]
    elif shape == "inserted":
        listed[100:100] = [(f"/d/new-{i}.png", "1:1") for i in range(5)]
    elif shape == "reordered":
        random.Random(1).shuffle(listed)
    elif shape == "shorter":
        listed = listed[:150] + listed[200:]
    if shape == "empty cache":
        cache_rows = []
    cached = pa.table(
        {
            "uri": pa.array([r[0] for r in cache_rows], pa.string()),
            "stamp": pa.array([r[1] for r in cache_rows], pa.string()),
            "sha256": pa.array([r[2] for r in cache_rows], pa.string()),
            "width": pa.array([1] * len(cache_rows), pa.int64()),
            "height": pa.array([1] * len(cache_rows), pa.int64()),
            "bucket": pa.array([0.5] * len(cache_rows), pa.float64()),
            "reason": pa.nulls(len(cache_rows), pa.string()),
        }
    )
    todo = pa.table({"uri": [r[0] for r in listed], "stamp": pa.array([r[1] for r in listed], pa.string())})
    first: dict[str, tuple[str, str]] = {}
    for uri, stamp, sha in cache_rows:
        first.setdefault(uri, (stamp, sha))
    expected_hits = [(u, first[u][1]) for u, s in listed if s is not None and u in first and first[u][0] == s]
    hits, misses = cached_verdicts(todo, cached)
    assert list(zip(hits["uri"].to_pylist(), hits["sha256"].to_pylist(), strict=True)) == expected_hits
    hit_uris = {u for u, _ in expected_hits}
    assert misses["uri"].to_pylist() == [u for u, _ in listed if u not in hit_uris]
