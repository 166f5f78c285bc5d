"""Shared fixtures: tiny demo data and a tiny pretrained backbone, made once per session on the CPU."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# production_stack / production_stack_env: PostgreSQL + moto S3 + mlflow server, started by the tests.
pytest_plugins = ["stack_fixtures"]

# Tests never touch a developer's real tracking server or S3 endpoint.
for _var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "ADAPTFLOW_S3_ENDPOINT_URL"):
    os.environ.pop(_var, None)
os.environ.setdefault("MPLBACKEND", "Agg")


@dataclass(frozen=True)
class TinyAssets:
    root: Path
    source: Path
    target: Path
    target_shifted: Path
    target_texture: Path
    weights: Path
    sha256: str

    @property
    def weights_uri(self) -> str:
        return self.weights.as_uri()

    def overrides(self, workdir: Path) -> list[str]:
        """Settings for fast CPU runs on the tiny demo set."""
        return [
            f"workdir={workdir}",
            f"backbone.weights_uri={self.weights_uri}",
            f"backbone.sha256={self.sha256}",
            "baseline.epochs=20",
            "finetune.epochs=2",
            "finetune.patience=2",
            "export.latency_runs=3",
            "evaluate.bootstrap_samples=200",
            "gate.min_accuracy=0.3",
            # 2 epochs on 32-px digits do not beat logistic regression on their pixels; the floor is
            # tested on its own (test_evaluate_export_registry) and by the demo
            "gate.reference_margin=null",
        ]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    from adaptflow.data.demo import write_demo_data
    from adaptflow.training.pretrain import pretrain

    root = tmp_path_factory.mktemp("tiny-demo")
    data = write_demo_data(root / "data", size=32, limit_per_class=40)
    weights = root / "backbone" / "resnet18-tiny.safetensors"
    result = pretrain(data.source, "resnet18", weights, epochs=2, input_size=32)
    sidecar = json.loads(weights.with_name(weights.name + ".json").read_text())
    assert sidecar["sha256"] == result.sha256
    return TinyAssets(
        root, data.source, data.target, data.target_shifted, data.target_texture, weights, result.sha256
    )


@pytest.fixture()
def tiny_settings(tiny_assets: TinyAssets, tmp_path: Path):  # type: ignore[no-untyped-def]
    from adaptflow.config import load_settings

    return load_settings(overrides=tiny_assets.overrides(tmp_path / "work"))


@dataclass(frozen=True)
class TinyBaseline:
    """One baseline run on the tiny target set, shared by every test that needs a trained candidate.

    Outputs live under ``work``: ``baseline/`` (result + ``candidate/``), ``features/``, ``weights/``.
    Tests write their own outputs beside them under names of their own.
    """

    settings: Any
    snapshot: Any
    inputs: Any
    result: Any
    work: Path

    @property
    def candidate_dir(self) -> Path:
        return self.work / "baseline" / "candidate"


@pytest.fixture(scope="session")
def tiny_baseline(tiny_assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> TinyBaseline:
    from adaptflow.config import load_settings
    from adaptflow.data.ingest import ingest
    from adaptflow.models.weights import resolve_weights
    from adaptflow.training.baseline import BaselineInputs, run_baseline

    work = tmp_path_factory.mktemp("tiny-baseline")
    settings = load_settings(overrides=tiny_assets.overrides(work))
    snapshot = ingest(str(tiny_assets.target), settings.ingest)
    weights = resolve_weights(settings.backbone, work / "weights")
    inputs = BaselineInputs(
        snapshot, settings.backbone, weights, settings.baseline, settings.finetune, work / "features"
    )
    return TinyBaseline(settings, snapshot, inputs, run_baseline(inputs, work / "baseline"), work)


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks_between_tests() -> Any:
    """``mlflow.set_tracking_uri`` (the stages call it, session fixtures too) also exports
    MLFLOW_TRACKING_URI for the process; every test starts, and ends, in the hermetic state set at
    the top of this file."""
    from mlflow.tracking._tracking_service import utils as mlflow_uri

    def reset() -> None:
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
            os.environ.pop(key, None)
        mlflow_uri._tracking_uri = None

    reset()
    yield
    reset()
