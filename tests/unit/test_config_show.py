"""``adaptflow config show``: the resolved settings as valid YAML, each key commented with its type and
description; ``--json`` is the plain dump."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
import yaml

from adaptflow.config import Settings, load_settings
from adaptflow.config_base import load_yaml
from adaptflow.config_cluster import Resources, Toleration
from adaptflow.config_describe import describe_settings, type_name
from cli_invoke import invoke

OVERRIDES = [
    "finetune.lr=1e-5",  # PyYAML 1.1 would read an unquoted 1e-05 back as a string
    "cluster.image=registry.example/adaptflow:1.0",
    "cluster.env={A: '1e4', B: 'yes', C: 'a # b', D: '[x]'}",  # strings YAML would read as something else
    "ingest.split_salt='null'",
    "registry.model_name='on'",
    "backbone.weights=null",
    "cluster.node_selector={pool: gpu}",
]


@pytest.mark.parametrize("overrides", [[], OVERRIDES], ids=["defaults", "awkward values"])
def test_the_commented_yaml_reads_back_as_the_settings(overrides: list[str]) -> None:
    settings = load_settings(None, overrides)
    text = describe_settings(settings)
    assert yaml.safe_load(text) == settings.model_dump(mode="json")
    assert load_yaml(text) == settings.model_dump(mode="json")
    assert Settings.model_validate(load_yaml(text)) == settings  # what `config show` prints is a config


def test_each_key_has_its_type_and_description() -> None:
    lines = describe_settings(load_settings()).splitlines()
    epochs = next(line for line in lines if line.strip().startswith("epochs: 50"))
    assert epochs.startswith("  epochs: 50 ")
    assert epochs.endswith("# int: L-BFGS steps of the linear probe (each up to lbfgs_iterations)")
    threads = next(line for line in lines if line.startswith("threads:"))
    assert "# int | null: torch threads per stage" in threads
    assert any(line.startswith("  extensions: [.png, ") and "# list[str]" in line for line in lines)
    assert any(line.startswith("baseline:") and "# BaselineConfig" in line for line in lines)
    assert any(
        line.startswith("  advisor:") and "When is fine-tuning worth its cost?" in line for line in lines
    )
    assert any("strategy: full" in line and "# linear_probe | partial | full" in line for line in lines)
    # every key line carries a comment
    assert all("  # " in line for line in lines if line and not line.startswith("#"))


@pytest.mark.parametrize(
    ("annotation", "name"),
    [
        (int, "int"),
        (float | None, "float | null"),
        (tuple[str, ...], "list[str]"),
        (tuple[int, ...], "list[int]"),
        (dict[str, Resources], "dict[str, Resources]"),
        (tuple[Toleration, ...], "list[Toleration]"),
        (Literal["a", "b"] | None, "a | b | null"),
        (bool, "bool"),
    ],
)
def test_type_names(annotation: Any, name: str) -> None:
    assert type_name(annotation) == name


def test_the_command_prints_the_commented_yaml_and_json() -> None:
    text = invoke("config", "show", "--set", "baseline.epochs=7").stdout
    assert "  epochs: 7  " in text and "# int: L-BFGS steps of the linear probe" in text
    expected = load_settings(None, ["baseline.epochs=7"]).model_dump(mode="json")
    assert yaml.safe_load(text) == expected
    assert json.loads(invoke("config", "show", "--json", "--set", "baseline.epochs=7").stdout) == expected
