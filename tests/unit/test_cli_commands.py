"""The CLI only parses and calls: one settings load per command, the demo backbone where it ranked,
and rollback's MLflow run owned by the library. Library calls are replaced by recorders here."""

from __future__ import annotations

import errno
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import adaptflow.config
import adaptflow.demo
import adaptflow.tracking
from adaptflow.cli import app
from adaptflow.cli_shared import fail
from adaptflow.config import Settings, load_settings
from adaptflow.demo import DemoAssets
from adaptflow.errors import ConfigError, DataError, Interrupted, StoreError, WeightsError
from adaptflow.promotion import AuditRecord, read_audit, rollback_champion
from adaptflow.registry import CHAMPION, get_champion
from adaptflow.tracking import embedded_tracking_uri, ensure_experiment
from cli_invoke import invoke

SHA = "c0ffee" * 10 + "abcd"


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, list[str]]]:
    """Every load_settings call the CLI makes."""
    calls: list[tuple[Any, list[str]]] = []

    def counting(path: Any = None, overrides: Any = ()) -> Settings:
        calls.append((path, list(overrides)))
        return load_settings(path, overrides)

    monkeypatch.setattr(adaptflow.config, "load_settings", counting)
    return calls


@pytest.fixture
def prepared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """prepare_demo replaced: fixed assets, the workdirs it was asked for recorded."""
    asked: list[Path] = []

    def fake(workdir: Path, *args: Any, **kwargs: Any) -> DemoAssets:
        asked.append(workdir)
        return DemoAssets(tmp_path / "demo-data", tmp_path / "demo.safetensors", SHA)

    monkeypatch.setattr(adaptflow.demo, "prepare_demo", fake)
    return asked


@pytest.fixture
def local_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Settings, str, bool]]:
    """run_local replaced by a recorder that reports an unchanged run."""
    import adaptflow.pipelines.local

    calls: list[tuple[Settings, str, bool]] = []

    def fake(settings: Settings, data_uri: str, force: bool = False) -> dict[str, Any]:
        calls.append((settings, data_uri, force))
        return {
            "status": "unchanged",
            "reason": "nothing changed",
            "champion_before": "1",
            "mlflow": {"tracking_uri": "sqlite:///x.db", "run_id": "r1"},
        }

    monkeypatch.setattr(adaptflow.pipelines.local, "run_local", fake)
    monkeypatch.setattr(adaptflow.tracking, "stage_timings", lambda uri, run_id: {"ingest": 1.0})
    return calls


def old_style(config: Path | None, overrides: list[str]) -> Settings:
    """What the CLI used to build with two loads: the same overrides, then workdir pinned absolute."""
    first = load_settings(config, overrides)
    return load_settings(config, [*overrides, f"workdir={Path(first.workdir).resolve()}"])


def test_run_loads_once_and_pins_an_absolute_workdir(
    loads: list[Any], local_runs: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("run", "--data", "imgs", "--set", "workdir=state", "--set", "seed=3", "--json", "--force")
    assert len(loads) == 1
    (settings, data, force), *_ = local_runs
    assert (data, force) == ("imgs", True)
    assert settings.workdir == str(tmp_path / "state")
    assert settings == old_style(None, ["workdir=state", "seed=3"])
    assert json.loads(result.stdout)["stage_seconds"] == {"ingest": 1.0}


def test_run_refuses_a_bad_key_before_any_work(loads: list[Any], local_runs: list[Any]) -> None:
    with pytest.raises(ConfigError, match=r"gate\.min_delt: unknown key"):
        invoke("run", "--data", "imgs", "--set", "gate.min_delt=0.1")
    assert local_runs == []


def test_demo_backbone_ranks_above_the_file_and_below_set(
    loads: list[Any], prepared: list[Path], local_runs: list[Any], tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("backbone:\n  weights_uri: file:///from/config.pth\n  sha256: aaaaaaaa\nseed: 5\n")
    home = tmp_path / "home"
    user = ["--set", "backbone.sha256=BBBBBBBB"]
    invoke("demo", "--workdir", str(home), "--dataset", "target-shifted", "-c", str(config), *user)
    assert len(loads) == 1 and prepared == [home]
    settings, data, _ = local_runs[0]
    assert data == str(tmp_path / "demo-data" / "target-shifted")
    demo_sets = [f"backbone.weights_uri={(tmp_path / 'demo.safetensors').as_uri()}", f"backbone.sha256={SHA}"]
    expected = old_style(config, [f"workdir={home}", *demo_sets, "backbone.sha256=BBBBBBBB"])
    assert settings == expected
    assert settings.backbone.weights_uri == (tmp_path / "demo.safetensors").as_uri()  # over the file
    assert settings.backbone.sha256 == "bbbbbbbb"  # --set wins over the demo
    assert settings.seed == 5


def test_demo_refuses_a_bad_key_before_making_its_assets(
    loads: list[Any], prepared: list[Path], local_runs: list[Any], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"gate\.min_delt: unknown key"):
        invoke("demo", "--workdir", str(tmp_path / "home"), "--set", "gate.min_delt=0.1")
    assert prepared == [] and local_runs == []


def test_compare_demo_uses_the_settings_workdir_once(
    loads: list[Any], prepared: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adaptflow.pipelines.local

    from adaptflow.contracts import CompareResult

    calls: list[tuple[Settings, str, list[str], Path]] = []

    def fake(settings: Settings, data: str, names: list[str], out: Path) -> Any:
        calls.append((settings, data, names, out))
        return CompareResult.model_construct(data_uri=data)

    monkeypatch.setattr(adaptflow.pipelines.local, "run_compare_local", fake)
    monkeypatch.setattr("adaptflow.render.compare_view", lambda result: f"compared {result.data_uri}")
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "compare", "--demo", "--strategies", "partial,full", "--train-per-class", "4", "--set", "workdir=w"
    )
    assert len(loads) == 1 and prepared == [tmp_path / "w"]
    settings, data, names, out = calls[0]
    assert (data, names, out, settings.ingest.train_per_class) == (
        str(tmp_path / "demo-data" / "target"),
        ["partial", "full"],
        tmp_path / "w" / "compare",
        4,
    )
    demo_sets = [f"backbone.weights_uri={(tmp_path / 'demo.safetensors').as_uri()}", f"backbone.sha256={SHA}"]
    assert settings == old_style(None, [*demo_sets, "workdir=w", "ingest.train_per_class=4"])
    assert result.stdout.strip() == f"compared {data}"


def test_compare_without_data_or_demo_is_a_usage_error(loads: list[Any]) -> None:
    result = CliRunner().invoke(app, ["compare"])
    assert result.exit_code == 2 and "pass --data DIR, or --demo" in result.output
    assert len(loads) == 1


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ConfigError("gate.min_delt: unknown key"), 2),  # a mistake in the command or its config
        (DataError("data source x does not exist"), 1),
        (StoreError("m has no champion to roll back"), 1),
        (WeightsError("sha256 mismatch"), 1),
        (OSError(errno.ENOSPC, "No space left on device"), 1),  # known by its hint, not by its class
        (Interrupted("run stopped by SIGTERM"), 143),
    ],
)
def test_the_exit_status_is_2_only_for_usage_and_config_mistakes(error: Exception, status: int) -> None:
    with pytest.raises(SystemExit) as ended:
        fail(error)
    assert ended.value.code == status


@pytest.fixture
def registry(tmp_path: Path) -> tuple[Path, str, MlflowClient]:
    """Model "m" with versions 1 and 2; 2 is the champion."""
    workdir = tmp_path / "state"
    uri = embedded_tracking_uri(workdir)
    client = MlflowClient(uri)
    experiment = ensure_experiment(uri, "adaptflow", workdir)
    client.create_registered_model("m")
    for _ in range(2):
        run = client.create_run(experiment)
        client.create_model_version("m", f"{run.info.artifact_uri}/model", run.info.run_id)
    client.set_registered_model_alias("m", CHAMPION, "2")
    return workdir, uri, client


def _rollback_runs(client: MlflowClient) -> list[Any]:
    experiment = client.get_experiment_by_name("adaptflow")
    assert experiment is not None
    return client.search_runs(
        [experiment.experiment_id],
        "tags.`adaptflow.stage` = 'rollback'",
        order_by=["attributes.start_time ASC"],
    )


def test_rollback_json_is_the_audit_record_and_its_run_finished(registry: Any) -> None:
    workdir, uri, client = registry
    out = invoke(
        "rollback",
        "--model",
        "m",
        "--to",
        "1",
        "--reason",
        "bad labels",
        "--set",
        f"workdir={workdir}",
        "--json",
    )
    record = json.loads(out.stdout)
    assert list(record) == [f.name for f in fields(AuditRecord)]
    assert record["action"] == "rollback" and (record["previous_champion"], record["new_champion"]) == (
        "2",
        "1",
    )
    assert record["reason"] == "bad labels" and record["metrics"] == {}
    assert record["lease"].endswith("locks/m.lock") and record["holder"]
    assert get_champion(uri, "m").version == "1"  # type: ignore[union-attr]
    (run,) = _rollback_runs(client)
    assert record["run_ids"] == {"rollback": run.info.run_id}
    assert run.info.status == "FINISHED" and run.info.run_name == "rollback m"
    assert read_audit(uri, "m")[-1] == record
    history = invoke("history", "--model", "m", "--set", f"workdir={workdir}").stdout
    assert "champion history of m" in history and "rollback" in history and "bad labels" in history


def test_a_refused_rollback_fails_its_run(registry: Any) -> None:
    workdir, uri, client = registry
    settings = load_settings(None, [f"workdir={workdir}"])
    with pytest.raises(StoreError, match="m has no version 42"):
        rollback_champion(uri, "adaptflow", workdir, settings.registry, "m", "42")
    (run,) = _rollback_runs(client)
    assert run.info.status == "FAILED"
    assert get_champion(uri, "m").version == "2"  # type: ignore[union-attr]


def test_an_interrupted_rollback_kills_its_run(registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import adaptflow.promotion

    workdir, uri, client = registry

    def interrupted(*args: Any, **kwargs: Any) -> AuditRecord:
        raise KeyboardInterrupt

    monkeypatch.setattr(adaptflow.promotion, "rollback", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rollback_champion(uri, "adaptflow", workdir, Settings().registry, "m", "1")
    (run,) = _rollback_runs(client)
    assert run.info.status == "KILLED"


def _command_paths(command: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    children = getattr(command, "commands", {})
    paths = [prefix]
    for name, child in children.items():
        paths += _command_paths(child, (*prefix, name))
    return paths


def test_every_help_names_values_without_python_types() -> None:
    import typer.main

    paths = _command_paths(typer.main.get_command(app))
    assert ("predict",) in paths and ("schedule", "delete") in paths and len(paths) > 15
    for path in paths:
        result = CliRunner().invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        # typer's own rendering shows `PATH <list[str]>`, `--json <bool>` and `{PATH}...`
        leaked = re.findall(r"<(?:list\[\w+\]|str|int|float|bool|path)>|\{[A-Z_]+\}", result.output)
        assert not leaked, (path, leaked, result.output)
