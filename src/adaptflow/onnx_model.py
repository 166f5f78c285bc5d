"""Running an exported model: its preprocessing and class names come from the ONNX metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adaptflow.contracts import Preprocessing
from adaptflow.errors import ExportError

META_PREPROCESSING = "adaptflow.preprocessing"
META_CLASSES = "adaptflow.class_names"
META_CANDIDATE = "adaptflow.candidate"
META_BACKBONE = "adaptflow.backbone"


@dataclass
class OnnxClassifier:
    session: Any
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    metadata: dict[str, str]

    @property
    def input_name(self) -> str:
        name: str = self.session.get_inputs()[0].name
        return name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.session.run(None, {self.input_name: batch.astype(np.float32)})[0]
        return out


def load_onnx_classifier(path: str | Path, threads: int | None = None) -> OnnxClassifier:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if META_PREPROCESSING not in meta or META_CLASSES not in meta:
        raise ExportError(
            f"{path} has no adaptflow preprocessing metadata",
            hint="only models exported by adaptflow carry their preprocessing; re-export it",
        )
    return OnnxClassifier(
        session=session,
        preprocessing=Preprocessing.model_validate_json(meta[META_PREPROCESSING]),
        class_names=tuple(json.loads(meta[META_CLASSES])),
        metadata=meta,
    )
