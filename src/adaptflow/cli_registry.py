"""The registry commands of ``adaptflow``: predict with a registered model, the champion's history,
rollback. Thin shells, like every command (cli.py registers them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from adaptflow import render
from adaptflow.cli_shared import ConfigOpt, JsonOpt, ModelNameOpt, SetOpt, emit, load, print_view
from adaptflow.errors import PredictionsFailed

if TYPE_CHECKING:
    from adaptflow.config import Settings


def _tracking_uri(config: Path | None, overrides: list[str]) -> tuple[Settings, str]:
    """The settings and the tracking store they name, checked reachable."""
    from adaptflow.tracking import check_tracking_reachable, resolve_tracking_uri

    settings = load(config, overrides)
    uri = resolve_tracking_uri(settings)
    check_tracking_reachable(uri)
    return settings, uri


def _registry(
    model: str | None, config: Path | None, overrides: list[str] | None
) -> tuple[Settings, str, str]:
    """Settings, the reachable tracking store, and the model: --model or registry.model_name."""
    settings, uri = _tracking_uri(config, overrides or [])
    return settings, uri, model or settings.registry.model_name


def history(
    model: ModelNameOpt = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the champion audit trail: every promotion and rollback."""
    from adaptflow.promotion import read_audit

    _, uri, name = _registry(model, config, overrides)
    emit(read_audit(uri, name), as_json, lambda rows: render.history_table(rows, name))


def rollback(
    model: ModelNameOpt = None,
    to: Annotated[
        str | None,
        typer.Option("--to", metavar="VERSION", help="version to make champion (default: the previous one)"),
    ] = None,
    reason: Annotated[str, typer.Option(metavar="TEXT", help="why, for the audit trail")] = "",
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="roll back to a version the gate rejected, or with another backbone or classes"
        ),
    ] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move `champion` back one step along the audit trail (or to --to), under the promotion lease."""
    from adaptflow.promotion import rollback_champion

    settings, uri, name = _registry(model, config, overrides)
    record = rollback_champion(
        uri, settings.tracking.experiment, settings.workdir, settings.registry, name, to, reason, force
    )
    emit(record.__dict__, as_json, lambda row: render.history_table([row], name))


def _emit_predictions(rows: list[dict[str, Any]], fmt: str, model: str) -> None:
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        sys.stdout.write(render.predictions_csv(rows))
    else:
        print_view(render.predictions_table(rows, model))


PREDICT_FORMATS = ("table", "json", "csv")


def _check_format(value: str) -> str:
    if value not in PREDICT_FORMATS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(PREDICT_FORMATS)}")
    return value


def predict(
    paths: Annotated[list[str], typer.Argument(metavar="PATH", help="image files or folders (one or more)")],
    model: Annotated[
        str, typer.Option(metavar="URI", help="models:/NAME@champion, models:/NAME/VERSION or a .onnx file")
    ] = "",
    output_format: Annotated[
        str,
        typer.Option("--format", metavar="table|json|csv", callback=_check_format, help="output format"),
    ] = "table",
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Classify images with a registered model, using the preprocessing stored in its metadata."""
    import mlflow

    from adaptflow.predict import expand_paths, load_model, predict_files

    settings, uri = _tracking_uri(config, overrides or [])
    mlflow.set_tracking_uri(uri)
    classifier = load_model(model or f"models:/{settings.registry.model_name}@champion", uri)
    rows = [p.__dict__ for p in predict_files(classifier, expand_paths(paths))]
    _emit_predictions(rows, "json" if as_json else output_format, model)
    failed = [r for r in rows if r["error"]]
    if failed:
        raise PredictionsFailed(failed, len(rows))
