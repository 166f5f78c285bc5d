from __future__ import annotations

from pathlib import Path

import pytest

from adaptflow.config import Settings, load_settings
from adaptflow.errors import ConfigError


def test_defaults_validate_and_hash_is_stable() -> None:
    a, b = load_settings(), load_settings()
    assert a == b
    assert a.config_hash() == b.config_hash()
    assert len(a.config_hash()) == 64


def test_override_sets_nested_value_with_yaml_typing() -> None:
    s = load_settings(overrides=["baseline.advisor.target_accuracy=0.5", "finetune.strategy=partial"])
    assert s.baseline.advisor.target_accuracy == 0.5
    assert s.finetune.strategy == "partial"
    assert s.config_hash() != load_settings().config_hash()


def test_workdir_and_tracking_do_not_change_the_config_hash() -> None:
    base = load_settings()
    moved = load_settings(overrides=["workdir=/elsewhere", "tracking.experiment=other"])
    assert base.config_hash() == moved.config_hash()


def test_unknown_key_names_its_path() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=["gate.min_delt=0.1"])
    assert "gate.min_delt: unknown key" in str(info.value)


def test_bad_value_names_its_path_and_all_errors_are_listed() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=["baseline.epochs=-1", "finetune.strategy=everything"])
    text = str(info.value)
    assert "baseline.epochs" in text
    assert "finetune.strategy" in text


def test_yaml_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  epochs: 3\n  strategy: partial\ngate:\n  min_delta: 0.02\n")
    s = load_settings(path, ["finetune.epochs=5"])
    assert (s.finetune.epochs, s.finetune.strategy, s.gate.min_delta) == (5, "partial", 0.02)


def test_yaml_unknown_section_is_reported_with_file_name(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("finetuning:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "finetuning: unknown key" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("- a\n- b\n", "must hold a mapping"), ("a: [unclosed\n", "not valid YAML")],
)
def test_malformed_yaml_files(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=fragment):
        load_settings(path)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings("/nonexistent/adaptflow.yaml")


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_settings(overrides=["baseline.epochs"])


def test_json_round_trip() -> None:
    s = load_settings(overrides=["seed=3"])
    assert Settings.from_json(s.to_json()) == s


def test_split_fractions_must_leave_training_data() -> None:
    with pytest.raises(ConfigError, match="ingest"):
        load_settings(overrides=["ingest.val_fraction=0.45", "ingest.test_fraction=0.45"])
