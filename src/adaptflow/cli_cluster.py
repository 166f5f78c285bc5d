"""``adaptflow submit`` and ``adaptflow schedule ...``: the Kubeflow Pipelines cluster commands.

They parse options, load the settings once and call :mod:`adaptflow.kfp_client`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from adaptflow import render
from adaptflow.cli_shared import (
    ClusterDataOpt,
    ConfigOpt,
    ExperimentOpt,
    ForceOpt,
    HostOpt,
    JsonOpt,
    NamespaceOpt,
    PlainArgumentsCommand,
    SetOpt,
    TokenOpt,
    component_image,
    emit,
    load,
)

if TYPE_CHECKING:
    from adaptflow.config import Settings

schedule_app = typer.Typer(
    help="Recurring runs on a Kubeflow Pipelines cluster.", no_args_is_help=True, rich_markup_mode=None
)


def _cluster_parameters(data: str, settings: Settings, force: bool, version: str) -> dict[str, Any]:
    return {"data_uri": data, "config_json": settings.to_json(), "force": force, "pipeline_version": version}


def submit(
    host: HostOpt,
    data: ClusterDataOpt,
    experiment: ExperimentOpt = "adaptflow",
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    run_name: Annotated[str | None, typer.Option(metavar="NAME", help="KFP run name")] = None,
    version_name: Annotated[
        str | None, typer.Option(metavar="NAME", help="pipeline version name (default: time + hash)")
    ] = None,
    token: TokenOpt = None,
    namespace: NamespaceOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compile, upload a pipeline version and start a run on a Kubeflow Pipelines cluster."""
    import tempfile

    from adaptflow.kfp_client import default_version_name, resolve_token
    from adaptflow.kfp_client import submit as kfp_submit
    from adaptflow.pipelines import PIPELINE_NAME, compile_pipeline

    settings = load(config, overrides or [])
    image = component_image(settings, None)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(settings, Path(tmp) / "adaptflow.yaml", image)
        version = version_name or default_version_name(package)
        result = kfp_submit(
            host,
            package,
            pipeline_name=PIPELINE_NAME,
            version_name=version,
            experiment=experiment,
            run_name=run_name,
            parameters=_cluster_parameters(data, settings, force, version),
            namespace=namespace,
            existing_token=resolve_token(token),
        )
    emit(result.to_dict(), as_json)


@schedule_app.command("create")
def schedule_create(
    host: HostOpt,
    cron: Annotated[
        str, typer.Option(metavar="CRON", help="6-field cron, seconds first: '0 0 3 * * 1' = Mondays 03:00")
    ],
    data: ClusterDataOpt,
    name: Annotated[
        str, typer.Option("--name", metavar="NAME", help="recurring run name")
    ] = "adaptflow-retrain",
    experiment: ExperimentOpt = "adaptflow",
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    max_concurrency: Annotated[int, typer.Option(metavar="N", help="runs allowed at once")] = 1,
    catchup: Annotated[bool, typer.Option("--catchup/--no-catchup", help="backfill missed runs")] = False,
    replace: Annotated[bool, typer.Option(help="replace a schedule of the same name")] = False,
    token: TokenOpt = None,
    namespace: NamespaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Schedule retraining with the latest uploaded pipeline version (upload one with `adaptflow submit`)."""
    from adaptflow.kfp_client import create_schedule, resolve_token
    from adaptflow.pipelines import PIPELINE_NAME

    settings = load(config, overrides or [])
    recurring_id = create_schedule(
        host,
        pipeline_name=PIPELINE_NAME,
        experiment=experiment,
        job_name=name,
        cron=cron,
        parameters=_cluster_parameters(data, settings, False, ""),
        max_concurrency=max_concurrency,
        no_catchup=not catchup,
        namespace=namespace,
        existing_token=resolve_token(token),
        replace=replace,
    )
    emit({"recurring_run_id": recurring_id, "name": name, "cron": cron}, as_json)


@schedule_app.command("list")
def schedule_list(
    host: HostOpt,
    experiment: Annotated[str | None, typer.Option(metavar="NAME", help="only this experiment")] = None,
    token: TokenOpt = None,
    namespace: NamespaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List recurring runs."""
    from adaptflow.kfp_client import list_schedules, resolve_token

    schedules = list_schedules(host, experiment, namespace=namespace, existing_token=resolve_token(token))
    emit([s.to_dict() for s in schedules], as_json, render.schedules_table)


@schedule_app.command("delete", cls=PlainArgumentsCommand)
def schedule_delete(
    host: HostOpt,
    recurring_run_id: Annotated[
        str, typer.Argument(metavar="RUN_ID", help="id from `adaptflow schedule list`")
    ],
    token: TokenOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Delete a recurring run."""
    from adaptflow.kfp_client import delete_schedule, resolve_token

    delete_schedule(host, recurring_run_id, namespace=namespace, existing_token=resolve_token(token))
    typer.echo(f"deleted {recurring_run_id}")
