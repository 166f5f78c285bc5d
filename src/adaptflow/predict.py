"""The consumer side: classify files with a registered model, using its own preprocessing."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from adaptflow.cpus import cpu_budget
from adaptflow.data.images import ImageDecodeError, decode_image, eval_transform
from adaptflow.errors import DataError
from adaptflow.onnx_model import OnnxClassifier, load_onnx_classifier
from adaptflow.registry import download_onnx

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str | None
    confidence: float | None
    error: str | None = None


def expand_paths(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files.extend(
                sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            )
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{raw} does not exist", hint="pass image files or folders")
    return files


def load_model(model_uri: str, tracking_uri: str | None = None, threads: int | None = None) -> OnnxClassifier:
    """``models:/NAME@alias``, ``models:/NAME/VERSION`` or a local .onnx file.

    ``threads``: onnxruntime's intra-op threads (None: the CPUs this process may use).
    """
    if model_uri.endswith(".onnx") and Path(model_uri).is_file():
        return load_onnx_classifier(model_uri, threads)
    with tempfile.TemporaryDirectory() as tmp:
        return load_onnx_classifier(download_onnx(model_uri, tmp, tracking_uri), threads)


def prepared_batches(
    prepare: Callable[[Path], torch.Tensor | str], files: list[Path], batch_size: int, workers: int
) -> Iterator[list[tuple[Path, torch.Tensor | str]]]:
    """``files`` in batches, in order, each file's ``prepare`` result beside it.

    With workers, the next batch is decoding in the pool while the caller runs the model on this
    one; holding only two batches bounds memory however many files there are.
    """
    chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    if workers <= 0 or not chunks:
        for chunk in chunks:
            yield [(f, prepare(f)) for f in chunk]
        return
    with ThreadPoolExecutor(workers, "predict-decode") as pool:
        ahead = [pool.submit(prepare, f) for f in chunks[0]]
        for n, chunk in enumerate(chunks):
            current = ahead
            ahead = [pool.submit(prepare, f) for f in chunks[n + 1]] if n + 1 < len(chunks) else []
            yield list(zip(chunk, (future.result() for future in current), strict=True))


def predict_files(
    model: OnnxClassifier, files: list[Path], batch_size: int = 64, workers: int | None = None
) -> list[Prediction]:
    """One prediction per file, in the order of ``files``; unreadable files carry their error.

    ``workers``: threads decoding and preprocessing ahead of the model (None: the CPUs this process
    may use; 0: none, all in this thread). PIL's decoders and torch's kernels release the GIL.
    """
    import torch

    transform = eval_transform(model.preprocessing)
    resize = model.preprocessing.resize_size

    def prepare(f: Path) -> torch.Tensor | str:
        try:
            # the shared opener: EXIF orientation and bit depth as in training; bounded by this resize
            tensor: torch.Tensor = transform(decode_image(f.read_bytes(), resize_size=resize))
            return tensor
        except (ImageDecodeError, OSError) as error:
            return str(error)

    threads = cpu_budget().cpus if workers is None else workers
    results: list[Prediction] = []
    for batch in prepared_batches(prepare, files, batch_size, threads):
        good = [(f, t) for f, t in batch if not isinstance(t, str)]
        probs = iter(_softmax(model.logits(torch.stack([t for _, t in good]).numpy())) if good else [])
        for f, item in batch:
            if isinstance(item, str):
                results.append(Prediction(str(f), None, None, item))
                continue
            row = next(probs)
            k = int(row.argmax())
            results.append(Prediction(str(f), model.class_names[k], float(row[k])))
    return results


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return out
