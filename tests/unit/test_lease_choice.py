"""Which lease guards a promotion: registry.lease_uri first, and a warning when only this machine is guarded."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adaptflow.config import RegistryConfig, load_settings
from adaptflow.errors import ConfigError
from adaptflow.lease import FileLease, S3Lease, is_remote_tracking, lease_for

LOCAL = "sqlite:////tmp/x/mlflow.db"
REMOTE = "http://mlflow.internal:5000"
WARNING = "guarded only on this machine"


def test_lease_uri_on_s3_is_one_lease_for_every_workdir(tmp_path: Path) -> None:
    cfg = RegistryConfig(lease_uri="s3://shared-leases/adaptflow/")
    leases = [lease_for("my model", cfg, tmp_path / pod, REMOTE, "mlflow-artifacts:/1") for pod in "ab"]
    assert all(isinstance(lease, S3Lease) for lease in leases)
    assert {lease.uri for lease in leases} == {"s3://shared-leases/adaptflow/my_model.json"}


def test_lease_uri_wins_over_s3_artifacts(tmp_path: Path) -> None:
    cfg = RegistryConfig(lease_uri="s3://leases")
    lease = lease_for("m", cfg, tmp_path, REMOTE, "s3://artifacts/exp")
    assert lease.uri == "s3://leases/m.json"


@pytest.mark.parametrize("form", ["file://{}", "{}"])
def test_lease_uri_on_a_shared_folder_is_a_file_lock_there(tmp_path: Path, form: str) -> None:
    shared = tmp_path / "nfs" / "locks"
    cfg = RegistryConfig(lease_uri=form.format(shared))
    leases = [lease_for("m", cfg, tmp_path / pod, REMOTE) for pod in "ab"]
    assert all(isinstance(lease, FileLease) for lease in leases)
    assert {lease.uri for lease in leases} == {(shared / "m.lock").as_uri()}


def test_s3_artifacts_without_lease_uri_get_a_lease_beside_them(tmp_path: Path) -> None:
    lease = lease_for("m", RegistryConfig(), tmp_path, REMOTE, "s3://artifacts/exp/1")
    assert isinstance(lease, S3Lease) and lease.uri == "s3://artifacts/exp/1/_leases/m.json"


def test_remote_tracking_without_lease_uri_warns_and_says_how(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="adaptflow.lease"):
        lease = lease_for("m", RegistryConfig(), tmp_path, REMOTE, "mlflow-artifacts:/1")
    assert isinstance(lease, FileLease) and lease.uri == (tmp_path / "locks" / "m.lock").resolve().as_uri()
    [record] = [r for r in caplog.records if WARNING in r.getMessage()]
    assert "registry.lease_uri=s3://" in record.getMessage() and REMOTE in record.getMessage()


def test_embedded_store_file_lock_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="adaptflow.lease"):
        lease_for("m", RegistryConfig(), tmp_path, LOCAL, str(tmp_path / "artifacts"))
    assert not [r for r in caplog.records if WARNING in r.getMessage()]


@pytest.mark.parametrize(
    ("uri", "remote"),
    [
        (LOCAL, False),
        ("file:///tmp/mlruns", False),
        ("/tmp/mlruns", False),
        ("C:/mlruns", False),
        (REMOTE, True),
        ("https://mlflow.example.com", True),
        ("postgresql://u@db/mlflow", True),
        ("databricks", True),
    ],
)
def test_remote_tracking_stores(uri: str, remote: bool) -> None:
    assert is_remote_tracking(uri) is remote


@pytest.mark.parametrize("bad", ["leases/relative", "http://leases", "s3://", "gs://bucket/x"])
def test_a_bad_lease_uri_names_the_key(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"registry\.lease_uri"):
        load_settings(overrides=[f"registry.lease_uri={bad}"])
