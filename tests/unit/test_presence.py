"""Manifest rows that name their sha256 are found by listing their folders, not by a stat each
(``data/presence.py``): the same snapshot, the same refusals, and the content address keys the cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

import adaptflow.data.presence as presence
from adaptflow.config import IngestConfig
from adaptflow.data.images import ImageStore
from adaptflow.data.ingest import ingest
from adaptflow.data.verdicts import VerdictCache
from adaptflow.errors import DataError

CLASSES = ("cat", "dog")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12, 12), (20 * i + c, 7 * i, 3 * c)).save(root / name / f"{i:02d}.bmp")
    return root


@pytest.fixture
def stat_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path stat'ed for the listing (not the one-by-one checks of refused rows)."""
    calls: list[str] = []
    real = presence._stat_chunk

    def counting(paths: list[str]) -> presence.Stats:
        calls.extend(paths)
        return real(paths)

    monkeypatch.setattr(presence, "_stat_chunk", counting)
    monkeypatch.setattr(presence, "SCAN_MIN_ROWS", 2)  # the fixture's folders hold 10 files
    return calls


def _manifest(data: Path, rows: list[tuple[str, str, str | None]]) -> Path:
    manifest = data / "manifest.csv"
    manifest.write_text("uri,label,sha256\n" + "".join(f"{u},{lab},{s or ''}\n" for u, lab, s in rows))
    return manifest


def _named_rows(data: Path) -> list[tuple[str, str, str | None]]:
    reference = ingest(str(data), IngestConfig())
    return [(str(Path(e.uri).relative_to(data.resolve())), e.label, e.sha256) for e in reference.entries]


def test_rows_named_by_sha256_are_found_by_listing_and_give_the_folder_s_snapshot(
    data: Path, stat_calls: list[str]
) -> None:
    reference = ingest(str(data), IngestConfig())
    rows = _named_rows(data)
    (data / "cat" / "link.bmp").symlink_to(data / "cat" / "00.bmp")  # a symlink named as a file
    os.mkfifo(data / "dog" / "pipe.bmp")
    stat_calls.clear()
    refused = [("cat/link.bmp", "cat", "ab" * 32), ("dog/pipe.bmp", "dog", "cd" * 32)]
    refused.append(("dog/gone.bmp", "dog", "ef" * 32))
    snapshot = ingest(str(_manifest(data, rows + refused)), IngestConfig())
    assert stat_calls == []  # every row named a sha256 in a folder that was listed
    assert snapshot.fingerprint == reference.fingerprint
    assert tuple(snapshot.entries) == tuple(reference.entries)
    reasons = {Path(q.uri).name: q.reason for q in snapshot.quarantined}
    assert "does not exist" in reasons["gone.bmp"]
    assert "pipe.bmp" in reasons and "00.bmp" in reasons  # the FIFO refused; the symlink read as its target
    assert "differs from the manifest's" in reasons["00.bmp"]  # (its target's content is not "ab...")


def test_rows_without_sha256_and_crowded_folders_are_stat_ed(
    data: Path, stat_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = _named_rows(data)
    stat_calls.clear()
    without = [(u, lab, None if lab == "dog" else sha) for u, lab, sha in rows]
    ingest(str(_manifest(data, without)), IngestConfig())
    assert sorted(Path(p).parent.name for p in stat_calls) == ["dog"] * 10
    stat_calls.clear()
    monkeypatch.setattr(presence, "SCAN_BASE_ENTRIES", 0)  # 5 rows may list at most 5 entries: cat has 10
    monkeypatch.setattr(presence, "SCAN_ENTRIES_PER_ROW", 1)
    few = [row for row in rows if row[1] == "dog" or row[0] < "cat/05"]
    snapshot = ingest(str(_manifest(data, few)), IngestConfig())
    assert sorted(Path(p).parent.name for p in stat_calls) == ["cat"] * 5
    assert len(snapshot.entries) == 15


def test_the_sha256_is_the_cache_key_and_a_mismatch_is_checked_again(data: Path, tmp_path: Path) -> None:
    manifest = _manifest(data, _named_rows(data))
    cache = VerdictCache(str(tmp_path / "cache"))
    cold = ingest(str(manifest), IngestConfig(), verdicts=cache)
    image = data / "cat" / "03.bmp"
    original = image.read_bytes()
    Image.new("RGB", (12, 12), (1, 2, 3)).save(image)  # the same size, another content
    edited = ingest(str(manifest), IngestConfig(), verdicts=cache)
    # the row's key is unchanged, so its verdict is reused: ingest trusts the content address ...
    assert cache.checked == 0 and tuple(edited.entries) == tuple(cold.entries)
    entry = next(e for e in edited.entries if e.uri == str(image.resolve()))
    with pytest.raises(DataError, match="changed after ingest"):
        ImageStore().read(entry)  # ... and the read at training refuses the other bytes

    manifest.write_text(manifest.read_text().replace("3.bmp,cat,", "3.bmp,cat,0"))  # a wrong sha256
    manifest.write_text(manifest.read_text().replace(",0" + entry.sha256, "," + "0" * 64))
    wrong = ingest(str(manifest), IngestConfig(), verdicts=cache)
    assert "differs from the manifest's" in wrong.quarantined[0].reason
    again = ingest(str(manifest), IngestConfig(), verdicts=cache)
    assert cache.checked == 1 and again.quarantined == wrong.quarantined  # a mismatch is never cached
    manifest.write_text(manifest.read_text().replace("0" * 64, entry.sha256))
    image.write_bytes(original)
    restored = ingest(str(manifest), IngestConfig(), verdicts=cache)
    assert tuple(restored.entries) == tuple(cold.entries) and not restored.quarantined
