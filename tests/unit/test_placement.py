"""Where the finetune stage trains (``cluster.finetune``): here, torchrun processes, or a Trainer job.

The launcher and the job client are replaced by recorders: test_ddp.py runs the real launcher with 2
gloo processes, and test_trainjob_lifecycle.py the real job client against a loopback API server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import adaptflow.training.distributed
import adaptflow.trainjob
from adaptflow.config import load_settings
from adaptflow.errors import ConfigError
from adaptflow.training.placement import train_elsewhere


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []
    monkeypatch.setattr(
        adaptflow.training.distributed,
        "launch_on_this_node",
        lambda n, argv: seen.append(("torchrun", (n, argv))),
    )
    monkeypatch.setattr(
        adaptflow.trainjob, "submit_and_wait", lambda settings, **kw: seen.append(("job", kw))
    )
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return seen


def _where(tmp_path: Path, config_json: str) -> dict[str, str]:
    return {
        "snapshot_dir": str(tmp_path / "snapshot"),
        "baseline_dir": str(tmp_path / "baseline"),
        "config_json": config_json,
        "parent_run_id": "run-1",
        "fingerprint": "f" * 64,
        "out_dir": str(tmp_path / "out" / "candidate"),
    }


def test_one_gpu_trains_in_this_process(calls: list[Any], tmp_path: Path) -> None:
    assert not train_elsewhere(load_settings(), **_where(tmp_path, "{}"))
    assert calls == []


def test_several_gpus_launch_torchrun_workers_reading_the_config_from_a_file(
    calls: list[Any], tmp_path: Path
) -> None:
    settings = load_settings(overrides=["cluster.finetune.gpus=2"])
    (tmp_path / "out").mkdir()
    assert train_elsewhere(settings, **_where(tmp_path, settings.to_json()))
    [(kind, (processes, argv))] = calls
    assert kind == "torchrun" and processes == 2
    config_file = argv[argv.index("--config-json-file") + 1]
    assert json.loads(Path(config_file).read_text()) == json.loads(settings.to_json())
    assert argv[argv.index("--out-dir") + 1] == str(tmp_path / "out" / "candidate")


def test_a_torchrun_worker_never_launches_more(calls: list[Any], tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    settings = load_settings(overrides=["cluster.finetune.gpus=2"])
    assert not train_elsewhere(settings, **_where(tmp_path, "{}"))
    assert calls == []


def test_several_nodes_submit_a_job_running_the_pipelines_image(calls: list[Any], tmp_path: Path) -> None:
    settings = load_settings(overrides=["cluster.finetune.nodes=2", "cluster.image=registry.example/a:1"])
    assert train_elsewhere(settings, **_where(tmp_path, "{}"))
    [(kind, job)] = calls
    assert kind == "job" and job["image"] == "registry.example/a:1" and job["parent_run_id"] == "run-1"


def test_several_nodes_without_an_image_is_a_config_error(calls: list[Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cluster\.image"):
        train_elsewhere(load_settings(overrides=["cluster.finetune.nodes=2"]), **_where(tmp_path, "{}"))
    assert calls == []
