"""KFP's MLflow plugin injects MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID / MLFLOW_RUN_ID: stages nest under it."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from adaptflow.steps import Lineage, ingest_step
from adaptflow.tracking import embedded_tracking_uri, ensure_experiment


def test_injected_run_is_honoured_and_lineage_recorded(
    tiny_assets, tiny_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    uri = embedded_tracking_uri(tmp_path / "store")
    experiment = ensure_experiment(uri, "kfp-plugin", tmp_path / "store")
    client = MlflowClient(uri)
    injected = client.create_run(experiment, run_name="kfp-plugin-run").info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
    monkeypatch.setenv("MLFLOW_RUN_ID", injected)

    out = ingest_step(
        str(tiny_assets.target),
        tiny_settings.to_json(),
        "",
        str(tmp_path / "snap"),
        lineage=Lineage("run-0f3c", "adaptflow", "v20261125"),
    )
    assert out.parent_run_id == injected
    parent = client.get_run(injected)
    assert parent.data.tags["kfp.run_id"] == "run-0f3c"
    assert parent.data.tags["kfp.pipeline_version"] == "v20261125"
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{injected}'")
    assert [c.info.run_name for c in children] == ["ingest"]
    assert children[0].data.tags["kfp.pipeline_name"] == "adaptflow"
    assert parent.info.status == "RUNNING"  # KFP owns the injected run's lifecycle
