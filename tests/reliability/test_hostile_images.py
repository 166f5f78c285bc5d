"""Hostile images: thin, 16-bit, float, sideways (EXIF), unreadable, looping, badly named, escaping.

Every file here is real (written by PIL, or a real symlink/FIFO), and ingest must quarantine the bad
ones with a reason naming the file, never crash and never read what it should not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptflow.config import IngestConfig, load_settings
from adaptflow.contracts import Preprocessing, Snapshot
from adaptflow.data.images import ImageDecodeError, ImageStore, decode_image
from adaptflow.data.ingest import ingest
from adaptflow.errors import ConfigError
from fifo_guard import ingest_without_opening

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _dataset(root: Path, per_class: int = 5) -> Path:
    """Two classes of distinct, ordinary 16x16 PNGs: enough for ingest to succeed."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def _reasons(snap: Snapshot) -> dict[str, str]:
    return {Path(q.uri).name: q.reason for q in snap.quarantined}


# --- size and shape -----------------------------------------------------------------------------


def test_a_thin_image_is_quarantined_by_aspect_ratio(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    Image.new("L", (1, 400_000)).save(data / "a" / "thin.png")
    Image.new("L", (10, 150), 128).save(data / "a" / "tall-but-fine.png")  # 15:1, under the default 20
    assert (data / "a" / "thin.png").stat().st_size < 2000  # a tiny file, 400k pixels: under the pixel limit

    snap = ingest(str(data), IngestConfig())
    reasons = _reasons(snap)
    assert set(reasons) == {"thin.png"}
    assert reasons["thin.png"].startswith("thin.png: ")
    assert "aspect ratio 4e+05 is above max_aspect_ratio=20" in reasons["thin.png"]
    assert any(e.uri.endswith("tall-but-fine.png") for e in snap.entries)

    # the limit is a setting: at 10 the 15:1 image goes too
    assert "tall-but-fine.png" in _reasons(ingest(str(data), IngestConfig(max_aspect_ratio=10)))


def test_the_resized_size_is_bounded_even_when_the_aspect_ratio_is_allowed(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    Image.new("L", (1, 400_000)).save(data / "a" / "thin.png")
    lenient = IngestConfig(max_aspect_ratio=1e6)

    # with the run's resize known: Resize(32) would make it 32 x 12,800,000
    reasons = _reasons(ingest(str(data), lenient, resize_size=32))
    assert "would be 32x12800000, above the pixel limit of 40000000" in reasons["thin.png"]
    # and without it, ingest bounds with the largest resize a run can use
    reasons = _reasons(ingest(str(data), lenient))
    assert "resized to a short side of 1170" in reasons["thin.png"]
    # a lowered max_image_pixels (about source images) does not refuse small images that Resize enlarges
    assert len(ingest(str(data), IngestConfig(max_image_pixels=50_000)).entries) == 10

    with pytest.raises(ImageDecodeError, match="32x12800000"):
        decode_image((data / "a" / "thin.png").read_bytes(), resize_size=32)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("1", "greater than 1"), (".inf", "finite"), (".nan", "finite"), ("0.5", "greater")],
)
def test_max_aspect_ratio_must_be_finite_and_above_one(value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=r"ingest\.max_aspect_ratio") as info:
        load_settings(overrides=[f"ingest.max_aspect_ratio={value}"])
    assert fragment in str(info.value)


# --- bit depth ----------------------------------------------------------------------------------

#: 226 grey levels, as 16-bit values (level * 257), and what they must become in 8 bit
LEVELS = np.arange(226)


def _grey(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image)
    assert image.mode == "RGB" and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0]


def test_a_16_bit_png_keeps_its_grey_levels(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.tile(LEVELS * 257, (4, 1)).astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    grey = _grey(decode_image(path.read_bytes()))
    assert np.array_equal(grey[0], LEVELS)  # clipping to 255 left 2 levels (0 and 255)

    # the top of the range maps to 255, the middle to 128: scaled by 1/257, not clipped or shifted
    Image.fromarray(np.array([[65535, 32896, 300, 0]], dtype=np.uint16)).save(path)
    assert _grey(decode_image(path.read_bytes()))[0].tolist() == [255, 128, 1, 0]


def test_a_32_bit_integer_tiff_holding_16_bit_data_is_scaled_the_same(tmp_path: Path) -> None:
    path = tmp_path / "deep.tif"
    Image.fromarray(np.tile(LEVELS * 257, (4, 1)).astype(np.int32)).save(path)
    assert Image.open(path).mode == "I"
    assert np.array_equal(_grey(decode_image(path.read_bytes()))[0], LEVELS)

    Image.fromarray(np.array([[0, 70_000]], dtype=np.int32)).save(path)
    with pytest.raises(ImageDecodeError, match=r"values in \[0, 70000\]; expected 16-bit"):
        decode_image(path.read_bytes())


def test_a_float_tiff_is_taken_as_zero_to_one(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32)).save(path)
    assert Image.open(path).mode == "F"
    assert _grey(decode_image(path.read_bytes()))[0].tolist() == [0, 128, 255, 64]  # not 0/1 (clipped)

    Image.fromarray(np.array([[0.0, 1000.0]], dtype=np.float32)).save(path)
    with pytest.raises(ImageDecodeError, match=r"values in \[0, 1000\]; expected 0..1"):
        decode_image(path.read_bytes())
    Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32)).save(path)
    with pytest.raises(ImageDecodeError, match="NaN"):
        decode_image(path.read_bytes())


def test_ingest_quarantines_an_out_of_range_float_image_by_name(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    Image.fromarray(np.full((8, 8), 300.0, dtype=np.float32)).save(data / "b" / "hdr.tif")
    reasons = _reasons(ingest(str(data), IngestConfig()))
    assert reasons["hdr.tif"].startswith("hdr.tif: float image has values in [300, 300]")


# --- EXIF orientation: ingest, training and predict see the same upright picture -----------------


def _sideways_jpeg(path: Path) -> None:
    """Stored 40x20, red on top and blue below, tagged orientation 6 (display rotated 90 degrees
    clockwise): shown upright it is 20x40, blue on the left and red on the right."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 40, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, quality=95, exif=exif.tobytes())


def _assert_upright(image: Image.Image) -> None:
    pixels = np.asarray(image).astype(int)
    assert image.size == (20, 40)
    left, right = pixels[:, :8].mean(axis=(0, 1)), pixels[:, -8:].mean(axis=(0, 1))
    assert left[2] > 200 and left[0] < 60, left  # blue
    assert right[0] > 200 and right[2] < 60, right  # red


def _orientation_model(path: Path) -> None:
    """A real ONNX classifier on 8x8 inputs: 'as-stored' scores red on top, 'upright' red on the right."""
    import onnx
    from onnx import TensorProto, helper

    weights = np.zeros((3, 8, 8, 2), dtype=np.float32)
    rows, cols = np.mgrid[0:8, 0:8]
    weights[0, :, :, 0] = np.where(rows < 4, 1.0, -1.0) / 32  # top red minus bottom red
    weights[0, :, :, 1] = np.where(cols >= 4, 1.0, -1.0) / 32  # right red minus left red
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["y"]),
        ],
        "orientation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, (192, 2), weights.reshape(192, 2).flatten().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    pre = Preprocessing(input_size=8, resize_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    helper.set_model_props(
        model,
        {
            "adaptflow.preprocessing": pre.model_dump_json(),
            "adaptflow.class_names": json.dumps(["as-stored", "upright"]),
        },
    )
    onnx.save(model, str(path))


def test_exif_orientation_is_applied_by_ingest_training_and_predict(tmp_path: Path) -> None:
    from adaptflow.onnx_model import load_onnx_classifier
    from adaptflow.predict import predict_files

    data = _dataset(tmp_path / "data")
    photo = data / "a" / "phone.jpg"
    _sideways_jpeg(photo)
    assert Image.open(photo).size == (40, 20)  # as stored

    _assert_upright(decode_image(photo.read_bytes()))

    snap = ingest(str(data), IngestConfig())
    entry = next(e for e in snap.entries if e.uri.endswith("phone.jpg"))
    assert (entry.width, entry.height) == (20, 40)
    _assert_upright(ImageStore().image(entry))  # training's reader

    _orientation_model(tmp_path / "orientation.onnx")
    model = load_onnx_classifier(tmp_path / "orientation.onnx")
    sideways = tmp_path / "sideways.png"
    Image.open(photo).save(sideways)  # the same pixels without the EXIF tag: the model's control
    upright, control = predict_files(model, [photo, sideways])
    assert (upright.label, control.label) == ("upright", "as-stored")


# --- files that cannot or must not be read --------------------------------------------------------


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their permissions"
)
def test_an_unreadable_file_is_quarantined_by_name(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    locked = data / "a" / "locked.png"
    Image.new("RGB", (8, 8)).save(locked)
    locked.chmod(0)
    try:
        reasons = _reasons(ingest(str(data), IngestConfig()))
    finally:
        locked.chmod(0o644)
    assert reasons["locked.png"].startswith("locked.png: unreadable")
    assert "Permission denied" in reasons["locked.png"]


def test_a_symlink_loop_is_quarantined_not_skipped(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    (data / "a" / "loop1.png").symlink_to("loop2.png")
    (data / "a" / "loop2.png").symlink_to("loop1.png")
    snap = ingest(str(data), IngestConfig())
    reasons = _reasons(snap)
    assert {name: reasons.get(name, "") for name in ("loop1.png", "loop2.png")} == {
        "loop1.png": f"{data}/a/loop1.png: symlink loop",
        "loop2.png": f"{data}/a/loop2.png: symlink loop",
    }
    assert len(snap.entries) == 10


def test_a_file_name_that_is_not_utf8_is_quarantined_and_the_snapshot_still_saves(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    raw = os.path.join(os.fsencode(data / "b"), b"caf\xe9-latin1.png")
    with open(raw, "wb") as handle:
        Image.new("RGB", (8, 8), (1, 2, 3)).save(handle, format="PNG")

    snap = ingest(str(data), IngestConfig())
    assert [(q.uri, q.reason) for q in snap.quarantined] == [
        (
            f"{data}/b/caf\\xe9-latin1.png",
            f"{data}/b/caf\\xe9-latin1.png: file name is not valid UTF-8; rename the file",
        )
    ]
    snap.save(tmp_path / "snapshot")  # JSON cannot hold the undecodable name: it must not be in the snapshot
    assert Snapshot.load(tmp_path / "snapshot").quarantined == snap.quarantined


def test_a_symlink_out_of_the_data_root_is_quarantined_and_never_read(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(outside / "secret.png")
    fifo = outside / "pipe.png"
    os.mkfifo(fifo)  # reading it would block: a read shows as a hang, not a silent pass
    (data / "a" / "escape.png").symlink_to(outside / "secret.png")
    (data / "b" / "pipe.png").symlink_to(fifo)

    snap = ingest_without_opening(data, IngestConfig(), fifo, "the data root")
    reasons = _reasons(snap)
    assert reasons["escape.png"].startswith(
        f"{data}/a/escape.png (resolves to {outside}/secret.png) is outside"
    )
    assert reasons["pipe.png"].startswith(f"{data}/b/pipe.png (resolves to {fifo}) is outside")
    assert "ingest.allowed_roots" in reasons["escape.png"]
    assert not any(e.uri.startswith(str(outside)) for e in snap.entries)

    # allowed_roots lets the folder in; the FIFO is then refused as not a regular file, still unread
    snap = ingest_without_opening(data, IngestConfig(allowed_roots=(str(outside),)), fifo, "the data root")
    assert any(e.uri == str(outside / "secret.png") for e in snap.entries)
    assert _reasons(snap)["pipe.png"] == f"{data}/b/pipe.png: not a regular file"
