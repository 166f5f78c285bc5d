"""What every ``adaptflow`` command shares: option types, the one settings load, and output."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import RenderableType

    from adaptflow.config import Settings

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override: section.key=value (repeatable)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="retrain even if data and config equal the champion's")
]
ModelNameOpt = Annotated[
    str | None, typer.Option(help="registered model name (default: registry.model_name)")
]
DataOpt = Annotated[str, typer.Option(help="ImageFolder dir, s3://bucket/prefix, or a .csv/.jsonl manifest")]
ClusterDataOpt = Annotated[str, typer.Option(help="data URI the cluster can read, e.g. s3://bucket/prefix")]
HostOpt = Annotated[
    str, typer.Option("--host", help="KFP API endpoint, e.g. http://localhost:8080 (port-forward)")
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", help="bearer token (default: $KFP_TOKEN, the KFP SA token file, or kube config)"),
]
NamespaceOpt = Annotated[str | None, typer.Option("--namespace", help="KFP multi-user namespace")]
ExperimentOpt = Annotated[str, typer.Option("--experiment", help="KFP experiment")]


def print_view(renderable: RenderableType) -> None:
    from rich.console import Console

    Console().print(renderable)


def emit(data: Any, as_json: bool, view: Callable[[Any], RenderableType] | None = None) -> None:
    """``--json`` (or no view): JSON on stdout; otherwise the view's rendering of ``data``."""
    if as_json or view is None:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        print_view(view(data))


def load(config: Path | None, overrides: list[str], *, absolute_workdir: bool = False) -> Settings:
    """The command's one settings load (defaults, file, --set), validated before any work starts."""
    from adaptflow.config import load_settings

    settings = load_settings(config, overrides)
    if absolute_workdir:  # stages may run from another directory (kfp.local)
        settings = settings.model_copy(update={"workdir": str(Path(settings.workdir).resolve())})
    return settings
