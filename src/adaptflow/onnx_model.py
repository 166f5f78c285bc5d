"""Running an exported model: its preprocessing and class names come from the ONNX metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adaptflow.contracts import Preprocessing
from adaptflow.cpus import cpu_budget
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
        # no copy when the batch is already contiguous float32 (astype always copies)
        feed = np.ascontiguousarray(batch, dtype=np.float32)
        out: np.ndarray = self.session.run(None, {self.input_name: feed})[0]
        return out


def session_options(threads: int | None = None) -> Any:
    """onnxruntime's options for one classifier: its intra-op pool fitted to the pod.

    Left at 0, onnxruntime sizes the pool from the host's cores, not the pod's CPU quota: the same
    oversubscription DESIGN.md ("Fit the pod") measured for torch. A CNN is one chain of ops, so a
    second (inter-op) pool has nothing to run in parallel: sequential mode, one inter-op thread.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )  # folds BatchNorm into Conv, fuses ReLU
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or cpu_budget().cpus
    options.inter_op_num_threads = 1
    return options


def load_onnx_classifier(path: str | Path, threads: int | None = None) -> OnnxClassifier:
    """``threads``: onnxruntime's intra-op threads; None: the CPUs this process may use."""
    import onnxruntime as ort

    options = session_options(threads)
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
