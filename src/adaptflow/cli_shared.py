"""What every ``adaptflow`` command shares: option types, the one settings load, and output."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand

if TYPE_CHECKING:
    from rich.console import RenderableType
    from typer import _click as click  # typer 0.29 vendors click: its parameters are not click's

    from adaptflow.config import Settings


class PlainArgumentsCommand(TyperCommand):
    """Help that names positional arguments as click does (``PATH...``, ``OUT``): typer 0.29 wraps them
    in braces in the usage line (``{PATH}...``) and adds the Python type (``PATH <list[str]>``)."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            is_argument = param.param_type_name == "argument"
            pieces.extend([_argument_label(param)] if is_argument else param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append((_argument_label(param), record[1]))
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _argument_label(param: click.Parameter) -> str:
    label = param.metavar or (param.name or "").upper()
    label += "..." if param.nargs != 1 else ""
    return label if param.required else f"[{label}]"


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", metavar="FILE", help="YAML config file")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="override: section.key=value (repeatable)"),
]
#: this command's --json (a failure prints its error object too) and --debug (and its traceback)
OUTPUT = {"json": False, "debug": False}


def _remember_json(value: bool) -> bool:
    OUTPUT["json"] = bool(value)  # click calls this on every parse, with the default when absent
    return value


JsonOpt = Annotated[
    bool, typer.Option("--json", help="print machine-readable JSON on stdout", callback=_remember_json)
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="retrain even if data and config equal the champion's")
]
ModelNameOpt = Annotated[
    str | None, typer.Option(metavar="NAME", help="registered model name (default: registry.model_name)")
]
DataOpt = Annotated[
    str,
    typer.Option(metavar="PATH|URI", help="ImageFolder dir, s3://bucket/prefix, or a .csv/.jsonl manifest"),
]
ClusterDataOpt = Annotated[
    str, typer.Option(metavar="URI", help="data URI the cluster can read, e.g. s3://bucket/prefix")
]
HostOpt = Annotated[
    str,
    typer.Option("--host", metavar="URL", help="KFP API endpoint, e.g. http://localhost:8080 (port-forward)"),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        metavar="TOKEN",
        help="bearer token (default: $KFP_TOKEN, the KFP SA token file, or kube config)",
    ),
]
NamespaceOpt = Annotated[
    str | None, typer.Option("--namespace", metavar="NAME", help="KFP multi-user namespace")
]
ExperimentOpt = Annotated[str, typer.Option("--experiment", metavar="NAME", help="KFP experiment")]


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


def component_image(settings: Settings, image: str | None) -> str:
    """The image a cluster's components run: ``--image``, else ``cluster.image``; never a guess."""
    from adaptflow.errors import ConfigError

    chosen = image or settings.cluster.image
    if not chosen:
        raise ConfigError(
            "no component image: cluster.image is not set and --image was not given",
            hint="build and push the image (`make image`), then set cluster.image=REGISTRY/adaptflow:TAG "
            "or pass --image",
        )
    return chosen


_STAGE_FAILED = re.compile(r"stage (\w+) failed: ")


def failed_stage(error: BaseException) -> str | None:
    """The pipeline stage that failed, or None when the command failed before or outside the DAG
    (config, weights, the tracking store)."""
    stage = getattr(error, "stage", None)
    if isinstance(stage, str):
        return stage
    # PipelineFailed (adaptflow.pipelines.local) names the stage only in its message
    found = _STAGE_FAILED.match(getattr(error, "message", "") or "")
    return found.group(1) if found else None


def usage_error(error: Exception) -> Exception:
    """click's usage errors (an unknown option, a bad choice) as a ConfigError: exit 2, with a hint."""
    from adaptflow.errors import ConfigError

    context = getattr(error, "ctx", None)
    command = context.command_path if context is not None else "adaptflow"
    format_message = getattr(error, "format_message", None)
    return ConfigError(format_message() if format_message else str(error), hint=f"see `{command} --help`")


def fail(error: Exception) -> NoReturn:
    """Ends a failed command: one ``error:`` line and its ``hint:`` on stderr, and with ``--json`` an error
    object on stdout (``{"status": "failed", "stage", "error", "hint"}``), with the usual exit status.

    An error nothing recognises (a bug) is re-raised after the JSON object: it keeps its traceback.
    """
    from adaptflow.errors import AdaptflowError, describe_error, store_error_from

    known = error if isinstance(error, AdaptflowError) else store_error_from(error)
    message, hint = describe_error(known or error)
    if OUTPUT["debug"]:
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    if OUTPUT["json"]:
        record = {"status": "failed", "stage": failed_stage(error), "error": message, "hint": hint}
        typer.echo(json.dumps(record, indent=2))
    if known is None and hint is None:
        raise error
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    sys.exit(known.exit_code if known is not None else 1)
