"""predict_files decodes in a thread pool ahead of onnxruntime: the output keeps the input's order."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptflow.contracts import Preprocessing
from adaptflow.cpus import cpu_budget
from adaptflow.onnx_model import META_CLASSES, META_PREPROCESSING, load_onnx_classifier
from adaptflow.predict import predict_files, prepared_batches

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def colour_model(path: Path) -> Path:
    """An ONNX classifier whose logits are the mean of each channel: a red image is "red"."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["logits"]),
        ],
        "colour",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    pre = Preprocessing(input_size=8, resize_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    for key, value in {
        META_PREPROCESSING: pre.model_dump_json(),
        META_CLASSES: json.dumps(list(COLOURS)),
    }.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    return path


@pytest.fixture()
def images(tmp_path: Path) -> tuple[list[Path], list[str | None]]:
    """23 files: colours in turn, every fifth one a broken PNG, and one file listed twice."""
    files: list[Path] = []
    expected: list[str | None] = []
    for n in range(23):
        f = tmp_path / f"{n:02d}.png"
        if n % 5 == 3:
            f.write_bytes(b"\x89PNG\r\n\x1a\n broken")
            expected.append(None)
        else:
            name = list(COLOURS)[n % 3]
            Image.new("RGB", (12, 10), COLOURS[name]).save(f)
            expected.append(name)
        files.append(f)
    return [*files, files[0]], [*expected, expected[0]]


@pytest.mark.parametrize("workers", [0, 1, 3, None])
def test_predictions_come_back_in_input_order(tmp_path: Path, images, workers: int | None) -> None:  # type: ignore[no-untyped-def]
    files, expected = images
    model = load_onnx_classifier(colour_model(tmp_path / "colour.onnx"))
    predictions = predict_files(model, files, batch_size=4, workers=workers)
    assert [p.path for p in predictions] == [str(f) for f in files]
    assert [p.label for p in predictions] == expected
    assert all(
        (p.error is None) == (label is not None) for p, label in zip(predictions, expected, strict=True)
    )


def test_prepared_batches_keep_order_when_later_files_finish_first() -> None:
    files = [Path(f"{n}.png") for n in range(10)]
    threads: set[str] = set()

    def prepare(f: Path) -> str:
        threads.add(threading.current_thread().name)
        time.sleep(0.002 * (10 - int(f.stem)))  # the first file of a batch is the slowest
        return f.stem

    batches = list(prepared_batches(prepare, files, 4, workers=3))  # type: ignore[arg-type]
    assert [[f.name for f, _ in b] for b in batches] == [
        [f.name for f in files[i : i + 4]] for i in (0, 4, 8)
    ]
    assert all(f.stem == item for b in batches for f, item in b)
    assert all(name.startswith("predict-decode") for name in threads)


def test_session_threads_fit_the_cpu_budget(tmp_path: Path) -> None:
    path = colour_model(tmp_path / "colour.onnx")
    options = load_onnx_classifier(path).session.get_session_options()
    assert options.intra_op_num_threads == cpu_budget().cpus
    assert options.inter_op_num_threads == 1
    assert load_onnx_classifier(path, threads=1).session.get_session_options().intra_op_num_threads == 1
    assert load_onnx_classifier(path).logits(np.zeros((2, 3, 8, 8), np.float64)).shape == (2, 3)
