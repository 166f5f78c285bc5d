"""What config and config_cluster share: the base of every section, and the YAML loader settings go through."""

from __future__ import annotations

import re
from functools import cache
from typing import Any, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, model_validator


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are immutable, and a value
    must already be of its field's type.

    Strict: ``epochs: true`` is not 1 and ``augment: "yes"`` is not true (lax pydantic converts both).
    An int is still a valid float (``lr: 1``). ``.inf`` and ``.nan`` are rejected everywhere: no
    threshold, rate or budget means anything at infinity.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _lists_as_tuples(cls, data: Any) -> Any:
        # strict takes only a tuple for a tuple field, but YAML and JSON (the settings' round trip)
        # have lists only; the items stay strictly checked
        if not isinstance(data, dict):
            return data
        tuples = _tuple_fields(cls)
        return {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in data.items()}


@cache
def _tuple_fields(cls: type[BaseModel]) -> frozenset[str]:
    return frozenset(
        name for name, field in cls.model_fields.items() if get_origin(field.annotation) is tuple
    )


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice."""


# YAML 1.1 (PyYAML) reads 1e-4 as a string, which strict floats reject; YAML 1.2 and JSON read a number
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus two silent guesses: a key given twice is an error (PyYAML keeps
    the last one), and ``1e-4`` is a float."""

    def construct_document(self, node: yaml.Node) -> Any:
        _no_duplicate_keys(node, (), set())
        return super().construct_document(node)


class ConfigDumper(yaml.SafeDumper):
    """Quotes what :class:`ConfigLoader` would read back as something else (a string like ``123e4``)."""


for _cls in (ConfigLoader, ConfigDumper):
    _cls.add_implicit_resolver(_FLOAT_TAG, _EXPONENT_FLOAT, list("-+0123456789"))


def _no_duplicate_keys(node: yaml.Node, path: tuple[str, ...], seen: set[int]) -> None:
    if id(node) in seen:  # an alias: checked where its anchor is (and recursive ones end here)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                line = key.start_mark.line + 1
                if name in first:
                    raise DuplicateKeyError(
                        f"duplicate key {'.'.join((*path, name))} on line {line} (first on line "
                        f"{first[name]}); keep one of them"
                    )
                first[name] = line
            _no_duplicate_keys(value, (*path, name), seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _no_duplicate_keys(item, (*path, str(index)), seen)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` through :class:`ConfigLoader`."""
    loader = ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def dump_yaml(data: Any) -> str:
    """``yaml.safe_dump`` (key order kept) that :func:`load_yaml` reads back as written."""
    return yaml.dump(data, Dumper=ConfigDumper, sort_keys=False)
