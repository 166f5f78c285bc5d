"""Config that means what it says: values pydantic or PyYAML used to guess at are errors naming the key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adaptflow.config import AdvisorConfig, FinetuneConfig, Settings, dump_settings, load_settings
from adaptflow.config_base import load_yaml
from adaptflow.config_cluster import MAX_ENV_BYTES
from adaptflow.errors import ConfigError
from adaptflow.training.advisor import advise, finetune_settings


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=overrides)
    return str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("finetune.lr=.inf", "finetune.lr"),
        ("gate.max_latency_ms=.inf", "gate.max_latency_ms"),
        ("baseline.advisor.budget_seconds=.nan", "baseline.advisor.budget_seconds"),
        ("export.tolerance=-.inf", "export.tolerance"),
    ],
)
def test_non_finite_floats_are_rejected(override: str, key: str) -> None:
    assert f"{key}: Input should be a finite number" in _error([override])


@pytest.mark.parametrize(
    ("override", "key", "kind"),
    [
        ("finetune.epochs=true", "finetune.epochs", "integer"),  # bool is not an int
        ("baseline.epochs='7'", "baseline.epochs", "integer"),
        ("finetune.batch_size=8.0", "finetune.batch_size", "integer"),
        ("finetune.augment='yes'", "finetune.augment", "boolean"),
        ("finetune.amp=1", "finetune.amp", "boolean"),
        ("finetune.lr=true", "finetune.lr", "number"),
        ("export.parity_batch_sizes=[1, true]", "export.parity_batch_sizes.1", "integer"),
    ],
)
def test_values_of_another_type_are_not_converted(override: str, key: str, kind: str) -> None:
    assert f"{key}: Input should be a valid {kind}" in _error([override])


def test_what_yaml_and_json_mean_natively_still_validates(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "finetune:\n  lr: 1e-4\n  augment: false\n  epochs: 3\n"
        "ingest:\n  extensions: [.png]\ncluster:\n  retry_stages: []\n  tolerations: [{key: k}]\n"
    )
    s = load_settings(path, ["gate.max_latency_ms=100", "export.tolerance=1e-12"])
    assert (s.finetune.lr, s.finetune.augment, s.finetune.epochs) == (1e-4, False, 3)
    assert s.gate.max_latency_ms == 100.0 and s.export.tolerance == 1e-12  # an int is a float; 1e-12 too
    assert s.ingest.extensions == (".png",) and s.cluster.retry_stages == ()
    # the round trip the pipeline makes: tuples become JSON lists and come back as tuples
    assert Settings.from_json(s.to_json()) == s
    assert Settings.from_json(Settings().to_json()) == Settings()


def test_resolved_yaml_reads_back_as_written() -> None:
    # a digits-and-e hash prefix must stay a string through dump_settings and load_yaml
    s = load_settings(overrides=["backbone.sha256='1234e567'"])
    assert load_yaml(dump_settings(s))["backbone"]["sha256"] == "1234e567"


def test_duplicate_yaml_key_is_named_with_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  lr: 0.1\n  epochs: 3\n  lr: 0.001\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = str(info.value)
    assert "duplicate key finetune.lr on line 4 (first on line 2)" in text and str(path) in text


def test_duplicate_section_is_an_error_too(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("gate:\n  min_delta: 0.1\nseed: 1\ngate:\n  alpha: 0.1\n")
    with pytest.raises(ConfigError, match="duplicate key gate on line 4"):
        load_settings(path)


def test_yaml_merge_keys_are_not_duplicates() -> None:
    data = load_yaml("base: &b {min_delta: 0.1, alpha: 0.1}\ngate:\n  <<: *b\n  alpha: 0.2\n")
    assert data["gate"] == {"min_delta": 0.1, "alpha": 0.2}


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("export.parity_batch_sizes=[]", "export.parity_batch_sizes: Tuple should have at least 1 item"),
        ("ingest.extensions=[]", "ingest: Value error, extensions: must list at least one"),
    ],
)
def test_empty_lists_that_need_a_value_are_rejected(override: str, fragment: str) -> None:
    assert fragment in _error([override])


def test_a_cluster_env_too_big_for_a_command_line_is_rejected() -> None:
    fits = load_settings(overrides=[f"cluster.env={{A: {'x' * (MAX_ENV_BYTES - 8)}}}"])
    assert len(fits.cluster.env["A"]) == MAX_ENV_BYTES - 8
    text = _error([f"cluster.env={{A: {'x' * 161_000}, B: b}}"])
    assert "cluster.env: Value error, 157.2 KiB in total, over the 32 KiB limit" in text


SHIFTED = {"baseline_val_accuracy": 0.5, "min_train_images_per_class": 100, "estimated_finetune_seconds": 1.0}


def test_an_overridden_strategy_is_recorded_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="adaptflow.training.advisor"):
        decision = advise({**SHIFTED, "domain_shift": 3.0}, AdvisorConfig(), FinetuneConfig(strategy="lora"))
    assert decision.strategy == "full" and decision.signals["strategy_override"] == "lora -> full"
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "finetune.strategy_locked" in caplog.records[0].getMessage()


def test_the_default_strategy_overridden_is_recorded_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="adaptflow.training.advisor"):
        signals = {**SHIFTED, "min_train_images_per_class": 10, "domain_shift": 0.1}
        decision = advise(signals, AdvisorConfig(), FinetuneConfig())
    assert decision.signals["strategy_override"] == "full -> partial"
    assert [r.levelno for r in caplog.records] == [logging.INFO]


@pytest.mark.parametrize(("shift", "per_class", "decay"), [(3.0, 100, 1.0), (0.1, 10, None)])
def test_a_locked_strategy_is_never_changed(shift: float, per_class: int, decay: float | None) -> None:
    ft = FinetuneConfig(strategy="lora", strategy_locked=True, layer_decay=0.5)
    signals = {**SHIFTED, "min_train_images_per_class": per_class, "domain_shift": shift}
    decision = advise(signals, AdvisorConfig(), ft)
    assert decision.should_finetune and decision.strategy == "lora"
    assert (
        "strategy_override" not in decision.signals and "kept (finetune.strategy_locked)" in decision.reason
    )
    # the learning-rate profile is not the strategy: uniform rates under high shift still apply
    assert decision.layer_decay == decay
    assert finetune_settings(ft, decision, AdvisorConfig()).strategy == "lora"


def test_a_locked_strategy_still_lets_the_advisor_keep_the_baseline() -> None:
    ft = FinetuneConfig(strategy="lora", strategy_locked=True)
    decision = advise({**SHIFTED, "baseline_val_accuracy": 0.99}, AdvisorConfig(), ft)
    assert not decision.should_finetune and "transfer learning is enough" in decision.reason


def test_lock_is_off_by_default_and_settable_from_the_command_line() -> None:
    assert load_settings().finetune.strategy_locked is False
    assert load_settings(overrides=["finetune.strategy_locked=true"]).finetune.strategy_locked is True
    assert "finetune.strategy_locked: Input should be a valid boolean" in _error(
        ["finetune.strategy_locked='true'"]
    )
