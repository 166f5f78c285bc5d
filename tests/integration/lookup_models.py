"""Real ONNX champions with a known accuracy, for the promotion race tests.

Each test image is a flat grey square whose grey level is its index, so a tiny ONNX graph can
look each image up in a table and answer right for exactly the images it is meant to. A version
registered with such a model re-scores, through adaptflow's own champion scoring (download from
the registry, onnxruntime, scikit-learn metrics), to the accuracy it was built with.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from adaptflow.config import EvaluateConfig, GateConfig
from adaptflow.contracts import ChampionRef, Evaluation, ManifestEntry, ModelScore, Preprocessing, Snapshot
from adaptflow.evaluation import rescore_champion
from adaptflow.onnx_model import META_CLASSES, META_PREPROCESSING
from adaptflow.promotion import ChampionRescore, PromotionInputs, RescoreChampion
from factories import export_result, model_score

CLASSES = ("even", "odd")
TEST_IMAGES = 100
SIZE = 4
STEP = 2  # grey level of image i is STEP * i: distinct after uint8 rounding
PREPROCESSING = Preprocessing(input_size=SIZE, resize_size=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
EVALUATE = EvaluateConfig(bootstrap_samples=100)
EXPORT = export_result(latency_ms=1.0)
GATE = GateConfig(min_accuracy=0.0, min_delta=0.001)


def write_test_split(folder: Path) -> Snapshot:
    """TEST_IMAGES grey squares, all in the test split; image i is labelled by its parity."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(TEST_IMAGES):
        path = folder / f"{i:03d}.png"
        Image.new("RGB", (SIZE, SIZE), (STEP * i,) * 3).save(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        entries.append(
            ManifestEntry(
                uri=str(path), sha256=digest, label=CLASSES[i % 2], split="test", width=SIZE, height=SIZE
            )
        )
    return Snapshot(
        source_uri=str(folder),
        class_names=CLASSES,
        entries=tuple(entries),
        fingerprint="f" * 64,
        counts={"train": 0, "val": 0, "test": TEST_IMAGES},
        class_counts={"test": {c: TEST_IMAGES // 2 for c in CLASSES}},
    )


def lookup_onnx(path: Path, accuracy: float, classes: tuple[str, ...] = CLASSES) -> Path:
    """An ONNX classifier that is right on the first round(accuracy * TEST_IMAGES) images, wrong after."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    right = round(accuracy * TEST_IMAGES)
    table = np.zeros((256 // STEP + 1, len(classes)), dtype=np.float32)
    for i in range(TEST_IMAGES):
        label = i % 2
        table[i, label if i < right else 1 - label] = 1.0
    nodes = [
        # x[:, 0, 0, 0] * 255 / STEP, rounded: the image's index
        helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["pixel"]),
        helper.make_node("Reshape", ["pixel", "flat"], ["level"]),
        helper.make_node("Mul", ["level", "scale"], ["scaled"]),
        helper.make_node("Round", ["scaled"], ["rounded"]),
        helper.make_node("Cast", ["rounded"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["logits"], axis=0),
    ]
    inits = [
        numpy_helper.from_array(np.array([0, 0, 0], dtype=np.int64), "starts"),
        numpy_helper.from_array(np.array([1, 1, 1], dtype=np.int64), "ends"),
        numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
        numpy_helper.from_array(np.array(255.0 / STEP, dtype=np.float32), "scale"),
        numpy_helper.from_array(table, "table"),
    ]
    graph = helper.make_graph(
        nodes,
        "lookup",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(classes)])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(
        model,
        {META_PREPROCESSING: PREPROCESSING.model_dump_json(), META_CLASSES: json.dumps(list(classes))},
    )
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def register_lookup_version(
    client: MlflowClient, model: str, experiment_id: str, accuracy: float, classes: tuple[str, ...] = CLASSES
) -> tuple[str, str]:
    """Logs a lookup model to a new run and registers it; returns (version, run id)."""
    run = client.create_run(experiment_id, run_name=f"lookup {accuracy}").info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(run, str(lookup_onnx(Path(tmp) / "model.onnx", accuracy, classes)), "model")
    version = client.create_model_version(model, f"runs:/{run}/model", run)
    return str(version.version), run


def rescorer(tracking_uri: str, snapshot: Snapshot) -> RescoreChampion:
    """adaptflow's own champion re-scoring, as the register stage wires it."""

    def rescore(ref: ChampionRef) -> ChampionRescore:
        return rescore_champion(ref, snapshot, tracking_uri, EVALUATE)

    return rescore


def stale_promotion(
    tracking_uri: str,
    model: str,
    version: str,
    run_id: str,
    accuracy: float,
    seen: ChampionRef | None,
    seen_score: ModelScore | None,
    snapshot: Snapshot,
) -> PromotionInputs:
    """What a register stage hands the gate: this version's score, and the champion it saw at evaluation."""
    candidate = model_score("candidate", accuracy, version=None, n=len(snapshot.entries))
    evaluation = Evaluation(
        scores=(candidate, *([seen_score] if seen_score else [])),
        winner="candidate",
        winner_reason="the only candidate",
        champion=seen,
        test_size=len(snapshot.entries),
        fingerprint=snapshot.fingerprint,
    )
    return PromotionInputs(
        tracking_uri,
        model,
        version,
        candidate,
        evaluation,
        EXPORT,
        GATE,
        {"pipeline": run_id, "register": run_id},
    )
