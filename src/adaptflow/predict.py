"""The consumer side: classify files with a registered model, using its own preprocessing."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptflow.data.images import ImageDecodeError, decode_image, eval_transform
from adaptflow.errors import DataError
from adaptflow.onnx_model import OnnxClassifier, load_onnx_classifier
from adaptflow.registry import download_onnx

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


def load_model(model_uri: str, tracking_uri: str | None = None) -> OnnxClassifier:
    """``models:/NAME@alias``, ``models:/NAME/VERSION`` or a local .onnx file."""
    if model_uri.endswith(".onnx") and Path(model_uri).is_file():
        return load_onnx_classifier(model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        return load_onnx_classifier(download_onnx(model_uri, tmp, tracking_uri))


def predict_files(model: OnnxClassifier, files: list[Path], batch_size: int = 64) -> list[Prediction]:
    import torch

    transform = eval_transform(model.preprocessing)
    results: list[Prediction] = []
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        tensors, ok = [], []
        for f in chunk:
            try:
                # the shared opener: EXIF orientation and bit depth as in training; bounded by this resize
                image = decode_image(f.read_bytes(), resize_size=model.preprocessing.resize_size)
                tensors.append(transform(image))
                ok.append(f)
            except (ImageDecodeError, OSError) as error:
                results.append(Prediction(str(f), None, None, str(error)))
        if not tensors:
            continue
        logits = model.logits(torch.stack(tensors).numpy())
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        for f, row in zip(ok, probs, strict=True):
            k = int(row.argmax())
            results.append(Prediction(str(f), model.class_names[k], float(row[k])))
    order = {str(f): n for n, f in enumerate(files)}
    return sorted(results, key=lambda r: order[r.path])
