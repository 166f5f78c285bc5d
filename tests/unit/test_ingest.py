from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from adaptflow.config import IngestConfig
from adaptflow.data.demo import write_demo_data
from adaptflow.data.ingest import assign_split, ingest
from adaptflow.errors import DataError


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_data(tmp_path_factory.mktemp("digits"), limit_per_class=30).target


def _expected_fingerprint(root: Path) -> str:
    """The documented definition, computed from the files on disk: sha256 over the sorted
    (sha256 of the file's bytes, class folder name) pairs, each written as ``"<sha>\\t<label>\\n"``."""
    pairs = sorted(
        (hashlib.sha256(f.read_bytes()).hexdigest(), f.parent.name)
        for f in root.glob("*/*.png")
        if f.is_file()
    )
    assert pairs, f"no images under {root}"
    return hashlib.sha256("".join(f"{sha}\t{label}\n" for sha, label in pairs).encode()).hexdigest()


def _copy(tree: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "data"
    shutil.copytree(tree, dest)
    return dest


def test_demo_data_layout(tmp_path: Path) -> None:
    data = write_demo_data(tmp_path, size=24, limit_per_class=3)
    assert sorted(p.name for p in data.source.iterdir()) == ["0", "1", "2", "3", "4"]
    assert sorted(p.name for p in data.target.iterdir()) == ["5", "6", "7", "8", "9"]
    image = Image.open(next(data.target_shifted.rglob("*.png")))
    assert image.mode == "RGB" and image.size == (24, 24)
    assert data.counts == {"source": 15, "target": 15, "target-shifted": 15, "target-texture": 15}
    # shifted images are a different picture of the same digit
    a = next((data.target / "5").iterdir())
    b = data.target_shifted / "5" / a.name
    assert a.read_bytes() != b.read_bytes()


def test_texture_target_draws_the_digit_by_orientation_not_brightness(tmp_path: Path) -> None:
    import numpy as np

    data = write_demo_data(tmp_path, size=32, limit_per_class=2)
    name = next((data.target / "8").iterdir()).name
    ink = np.asarray(Image.open(data.target / "8" / name).convert("L"), dtype=float) / 255
    texture = np.asarray(Image.open(data.target_texture / "8" / name).convert("L"), dtype=float) / 255
    strokes, background = ink > 0.8, ink < 0.2
    assert strokes.sum() > 20 and background.sum() > 20
    # the same mean brightness inside and outside the strokes: ink alone cannot find the digit
    assert abs(texture[strokes].mean() - texture[background].mean()) < 0.1
    # but the stripes run the other way: +45 degrees repeat along the anti-diagonal, -45 along the diagonal
    diagonal = np.abs(texture[1:, 1:] - texture[:-1, :-1])
    assert diagonal[strokes[1:, 1:]].mean() > 2 * diagonal[background[1:, 1:]].mean()


def test_snapshot_counts_classes_and_fingerprint(digits: Path) -> None:
    snap = ingest(str(digits), IngestConfig())
    assert snap.class_names == ("5", "6", "7", "8", "9")
    assert sum(snap.counts.values()) == 150
    assert all(snap.counts[s] > 0 for s in ("train", "val", "test"))
    assert snap.fingerprint == _expected_fingerprint(digits)
    assert snap.quarantined == ()
    again = ingest(str(digits), IngestConfig())
    assert again.fingerprint == snap.fingerprint


def test_fingerprint_follows_content_and_labels_not_names_or_order(digits: Path, tmp_path: Path) -> None:
    data = _copy(digits, tmp_path)
    base = ingest(str(data), IngestConfig()).fingerprint
    assert base == _expected_fingerprint(data)

    # renaming files (which also changes the order they are listed in) changes nothing
    for i, f in enumerate(sorted((data / "6").glob("*.png"))):
        f.rename(f.with_name(f"zz-{1000 - i}-{f.name}"))
    assert ingest(str(data), IngestConfig()).fingerprint == base

    # relabelling one image (same bytes, another class) is a different dataset
    moved = sorted((data / "5").glob("*.png"))[0]
    moved.rename(data / "9" / moved.name)
    relabelled = ingest(str(data), IngestConfig()).fingerprint
    assert relabelled != base
    assert relabelled == _expected_fingerprint(data)
    (data / "9" / moved.name).rename(moved)
    assert ingest(str(data), IngestConfig()).fingerprint == base

    # changing one pixel of one image is a different dataset
    target = sorted((data / "7").glob("*.png"))[0]
    image = Image.open(target).convert("RGB")
    pixel = image.getpixel((0, 0))
    assert isinstance(pixel, tuple)
    image.putpixel((0, 0), tuple(255 - int(c) for c in pixel))
    image.save(target)
    edited = ingest(str(data), IngestConfig()).fingerprint
    assert edited != base
    assert edited == _expected_fingerprint(data)


def test_split_is_by_content_and_stable_when_the_dataset_grows(digits: Path, tmp_path: Path) -> None:
    data = _copy(digits, tmp_path)
    before = {e.sha256: e.split for e in ingest(str(data), IngestConfig()).entries}
    extra = write_demo_data(tmp_path / "more", limit_per_class=40).target
    for f in sorted((extra / "7").glob("*.png"))[30:]:
        shutil.copy(f, data / "7" / f"new-{f.name}")
    grown = ingest(str(data), IngestConfig())
    assert len(grown.entries) == len(before) + 10
    assert all(before[e.sha256] == e.split for e in grown.entries if e.sha256 in before)
    assert grown.fingerprint == _expected_fingerprint(data)
    assert grown.fingerprint != _expected_fingerprint(digits)  # the ten new images count


def test_assign_split_is_deterministic_and_respects_fractions() -> None:
    cfg = IngestConfig(val_fraction=0.1, test_fraction=0.2)
    shas = [f"{i:064x}" for i in range(4000)]
    splits = [assign_split(s, cfg) for s in shas]
    assert splits == [assign_split(s, cfg) for s in shas]
    assert abs(splits.count("test") / 4000 - 0.2) < 0.03
    assert abs(splits.count("val") / 4000 - 0.1) < 0.03


def test_corrupt_and_empty_files_are_quarantined_and_do_not_stop_the_run(
    digits: Path, tmp_path: Path
) -> None:
    data = _copy(digits, tmp_path)
    good = next((data / "5").glob("*.png")).read_bytes()
    (data / "5" / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "6" / "empty.png").write_bytes(b"")
    (data / "7" / "notanimage.png").write_bytes(b"this is text, not a PNG")
    snap = ingest(str(data), IngestConfig())
    reasons = {Path(q.uri).name: q.reason for q in snap.quarantined}
    assert set(reasons) == {"truncated.png", "empty.png", "notanimage.png"}
    assert "empty file" in reasons["empty.png"]
    assert "cannot decode" in reasons["truncated.png"]
    assert sum(snap.counts.values()) == 150  # every good image kept


def test_duplicates_never_straddle_splits(digits: Path, tmp_path: Path) -> None:
    data = _copy(digits, tmp_path)
    original = next((data / "8").glob("*.png"))
    shutil.copy(original, data / "8" / "copy-of-it.png")
    snap = ingest(str(data), IngestConfig())
    dupes = [q for q in snap.quarantined if "duplicate content" in q.reason]
    assert len(dupes) == 1
    assert len({e.sha256 for e in snap.entries}) == len(snap.entries)


def test_same_content_with_two_labels_is_quarantined(digits: Path, tmp_path: Path) -> None:
    data = _copy(digits, tmp_path)
    original = next((data / "8").glob("*.png"))
    shutil.copy(original, data / "9" / "mislabelled.png")
    snap = ingest(str(data), IngestConfig())
    conflicted = [q for q in snap.quarantined if "labelled 8 and 9" in q.reason]
    assert len(conflicted) == 2


def test_empty_class_folder_is_a_clear_error(digits: Path, tmp_path: Path) -> None:
    data = _copy(digits, tmp_path)
    (data / "empty-class").mkdir()
    with pytest.raises(DataError, match="class 'empty-class' has 0 valid images") as info:
        ingest(str(data), IngestConfig())
    assert info.value.hint and "min_images_per_class" in info.value.hint


def test_class_below_minimum_is_a_clear_error(digits: Path, tmp_path: Path) -> None:
    data = _copy(digits, tmp_path)
    for f in sorted((data / "9").glob("*.png"))[3:]:
        f.unlink()
    with pytest.raises(DataError, match=r"class '9' has 3 valid images \(minimum 5\)"):
        ingest(str(data), IngestConfig())


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ingest(str(tmp_path / "nope"), IngestConfig())


def test_folder_without_classes(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class folders"):
        ingest(str(tmp_path), IngestConfig())


def test_csv_and_jsonl_manifests(digits: Path, tmp_path: Path) -> None:
    files = sorted(digits.rglob("*.png"))
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("uri,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files))
    jsonl = tmp_path / "m.jsonl"
    # relative paths resolve against the manifest's folder
    rel = tmp_path / "imgs"
    shutil.copytree(digits, rel)
    jsonl.write_text(
        "".join(
            json.dumps({"path": f"imgs/{f.parent.name}/{f.name}", "label": f.parent.name}) + "\n"
            for f in files
        )
    )
    # the CSV's absolute paths point outside its folder: allowed only through ingest.allowed_roots
    refused = ingest(str(jsonl), IngestConfig())  # the JSONL's rows stay inside its folder
    with pytest.raises(DataError, match="0 valid images"):
        ingest(str(csv_path), IngestConfig())
    cfg = IngestConfig(allowed_roots=(str(digits),))
    from_csv, from_jsonl, from_dir = (ingest(str(p), cfg) for p in (csv_path, jsonl, digits))
    assert from_csv.fingerprint == from_jsonl.fingerprint == from_dir.fingerprint == refused.fingerprint


def test_manifest_row_without_label(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("uri,label\n/x.png,\n")
    with pytest.raises(DataError, match="row 1 needs"):
        ingest(str(path), IngestConfig())


def test_oversized_image_is_quarantined(digits: Path, tmp_path: Path) -> None:
    data = _copy(digits, tmp_path)
    Image.new("RGB", (300, 300)).save(data / "5" / "huge.png")
    snap = ingest(str(data), IngestConfig(max_image_pixels=50_000))
    assert any("max_image_pixels" in q.reason for q in snap.quarantined)


def test_one_class_is_a_clear_error(digits: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(digits / "5", data / "5")
    with pytest.raises(
        DataError, match=r"has only one class \('5'\); a classifier needs at least two"
    ) as info:
        ingest(str(data), IngestConfig())
    assert info.value.hint and "a folder (or manifest label) per class" in info.value.hint
