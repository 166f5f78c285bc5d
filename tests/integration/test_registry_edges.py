"""Promotion and rollback at the edges: a champion of other classes, and rollbacks with nowhere to go."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from lookup_models import register_lookup_version, rescorer, stale_promotion, write_test_split
from mlflow.tracking import MlflowClient

from adaptflow.lease import FileLease
from adaptflow.promotion import promote_under_lease
from adaptflow.registry import CHAMPION, get_champion
from adaptflow.tracking import embedded_tracking_uri, ensure_experiment

pytestmark = pytest.mark.integration


def test_a_moved_champion_of_other_classes_is_not_comparable(tmp_path: Path) -> None:
    """The champion moves during the run to a model of other classes: the absolute gate decides, and says so."""
    uri = embedded_tracking_uri(tmp_path)
    snapshot = write_test_split(tmp_path / "test-split")
    client = MlflowClient(uri)
    experiment = ensure_experiment(uri, "edges", tmp_path)
    client.create_registered_model("m")
    v0, _ = register_lookup_version(client, "m", experiment, 0.5)
    client.set_registered_model_alias("m", CHAMPION, v0)
    seen = get_champion(uri, "m")
    assert seen is not None
    seen_score = rescorer(uri, snapshot)(seen).score
    assert seen_score is not None
    other, _ = register_lookup_version(client, "m", experiment, 0.9, classes=("cat", "dog"))
    client.set_registered_model_alias("m", CHAMPION, other)  # moved while this run was evaluating
    version, run = register_lookup_version(client, "m", experiment, 0.8)
    inputs = stale_promotion(uri, "m", version, run, 0.8, seen, seen_score, snapshot)
    decision, before, after = promote_under_lease(
        inputs, FileLease(tmp_path / "m.lock"), rescorer(uri, snapshot)
    )
    assert decision.promote and (before, after) == (other, version)
    assert any(
        f"champion v{other} predicts classes ['cat', 'dog'], this data has ['even', 'odd']: not comparable, "
        "so the absolute thresholds decide" in r
        for r in decision.reasons
    ), decision.reasons
    assert not any("beats champion" in r for r in decision.reasons)


def _rollback(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ADAPTFLOW_"))}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "adaptflow.cli",
            "rollback",
            "--model",
            "m",
            "--set",
            f"workdir={workdir}",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def registry_without_history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MlflowClient]:
    """Model "m" with one version, not yet champion."""
    workdir = tmp_path_factory.mktemp("rollback")
    uri = embedded_tracking_uri(workdir)
    client = MlflowClient(uri)
    experiment = ensure_experiment(uri, "adaptflow", workdir)
    client.create_registered_model("m")
    register_lookup_version(client, "m", experiment, 0.7)
    return workdir, client


def _assert_clean_error(result: subprocess.CompletedProcess[str], message: str, hint: str) -> None:
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {message}"], result.stderr
    assert f"hint: {hint}" in result.stderr
    assert "Traceback" not in result.stderr


def test_rollback_without_a_champion(registry_without_history) -> None:  # type: ignore[no-untyped-def]
    workdir, client = registry_without_history
    _assert_clean_error(_rollback(workdir), "m has no champion to roll back", "nothing was ever promoted")
    assert get_champion(client.tracking_uri, "m") is None


def test_rollback_with_no_earlier_champion_and_to_an_unknown_version(registry_without_history) -> None:  # type: ignore[no-untyped-def]
    workdir, client = registry_without_history
    client.set_registered_model_alias("m", CHAMPION, "1")
    _assert_clean_error(
        _rollback(workdir),
        "the audit trail of m has no champion before v1",
        "pass --to VERSION to choose one explicitly",
    )
    unknown = _rollback(workdir, "--to", "42")
    _assert_clean_error(
        unknown, "m has no version 42", "its versions are 1; `adaptflow history` lists its champions"
    )
    assert get_champion(client.tracking_uri, "m").version == "1"  # type: ignore[union-attr]


def test_rollback_to_a_rejected_version_of_other_classes_needs_force(tmp_path: Path) -> None:
    import json

    uri = embedded_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    experiment = ensure_experiment(uri, "adaptflow", tmp_path)
    client.create_registered_model("m")
    old, _ = register_lookup_version(client, "m", experiment, 0.7, classes=("cat", "dog"))
    new, _ = register_lookup_version(client, "m", experiment, 0.8)
    for version, classes, verdict in ((old, ["cat", "dog"], "rejected"), (new, ["even", "odd"], "promoted")):
        client.set_model_version_tag("m", version, "adaptflow.class_names", json.dumps(classes))
        client.set_model_version_tag("m", version, "adaptflow.gate.decision", verdict)
        client.set_model_version_tag("m", version, "adaptflow.gate.reasons", f"{verdict} by the test")
    client.set_registered_model_alias("m", CHAMPION, new)

    refused = _rollback(tmp_path, "--to", old)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs --force" in errors[0], refused.stderr
    assert f"the gate did not promote v{old} (rejected: rejected by the test)" in errors[0]
    assert f'classes: v{old} has ["cat", "dog"], v{new} has ["even", "odd"]' in errors[0]
    assert get_champion(uri, "m").version == new  # type: ignore[union-attr]

    forced = _rollback(tmp_path, "--to", old, "--force")
    assert forced.returncode == 0, forced.stderr
    assert get_champion(uri, "m").version == old  # type: ignore[union-attr]
    assert "time (UTC)" in forced.stdout and f"v{old}" in forced.stdout  # a table, not JSON
    assert "WARNING" in forced.stderr and "classes:" in forced.stderr
