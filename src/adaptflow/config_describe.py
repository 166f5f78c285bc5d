"""``adaptflow config show``: the resolved settings as YAML, each key commented with its type and description.

The output is valid YAML that reads back (``yaml.safe_load`` or :func:`adaptflow.config_base.load_yaml`)
as ``settings.model_dump(mode="json")``: sections are nested mappings, lists and mappings of values
are flow YAML on one line, and every comment follows its value.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from adaptflow.config_base import ConfigDumper

#: comments start at this column at most (a longer ``key: value`` pushes its own comment right)
COMMENT_COLUMN = 44
HEADER = (
    "# adaptflow configuration, resolved: defaults, then the file, then --set\n"
    "# each key: value  # type: description\n"
)


def type_name(annotation: Any) -> str:
    """A field's annotation as a reader of YAML sees it: ``int``, ``float | null``, ``list[str]``,
    ``full | lora``, ``dict[str, Resources]``."""
    if annotation is type(None):
        return "null"
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " | ".join([*names, "null"] if type(None) in args else names)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (tuple, list, set, frozenset):
        items = [a for a in args if a is not Ellipsis]
        inner = type_name(items[0]) if len(set(items)) == 1 else ", ".join(type_name(a) for a in items)
        return f"list[{inner}]" if items else "list"
    if origin is dict:
        return f"dict[{', '.join(type_name(a) for a in args)}]" if args else "dict"
    return getattr(annotation, "__name__", str(annotation))


def _flow(value: Any) -> str:
    """One value as flow YAML on one line (strings quoted where YAML would read something else)."""
    text = yaml.dump(
        [value], Dumper=ConfigDumper, default_flow_style=True, sort_keys=False, width=float("inf")
    )
    return text.strip()[1:-1]  # the one-item list's brackets


def _comment(annotation: Any, description: str | None) -> str:
    text = type_name(annotation) + (f": {description}" if description else "")
    return " ".join(text.split())  # one line, whatever the description holds


def _section_lines(model: BaseModel, data: dict[str, Any], indent: int) -> list[str]:
    rows: list[tuple[str, str]] = []  # (key: value, comment)
    nested: dict[int, list[str]] = {}  # row index -> the nested section's lines under it
    pad = "  " * indent
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            doc = info.description or (type(value).__doc__ or "").strip().split("\n")[0]
            rows.append((f"{pad}{name}:", _comment(info.annotation, doc)))
            nested[len(rows) - 1] = _section_lines(value, data[name], indent + 1)
        else:
            rows.append((f"{pad}{name}: {_flow(data[name])}", _comment(info.annotation, info.description)))
    column = min(max(len(text) for text, _ in rows), COMMENT_COLUMN)
    lines: list[str] = []
    for index, (text, comment) in enumerate(rows):
        lines.append(f"{text.ljust(column)}  # {comment}")
        lines.extend(nested.get(index, []))
    return lines


def describe_settings(settings: BaseModel) -> str:
    """The settings as commented YAML: ``  epochs: 50  # int: L-BFGS steps of the linear probe ...``."""
    return HEADER + "\n".join(_section_lines(settings, settings.model_dump(mode="json"), 0)) + "\n"
