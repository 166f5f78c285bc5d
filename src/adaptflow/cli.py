"""The ``adaptflow`` command: a thin shell over the library (all logic lives in ``adaptflow.*``)."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from adaptflow import __version__
from adaptflow.demo import TARGET_TREES
from adaptflow.errors import AdaptflowError
from adaptflow.logs import setup_logging

app = typer.Typer(
    name="adaptflow",
    help="Adapt pretrained vision backbones to your images: transfer learning first, fine-tuning when it pays.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
log = logging.getLogger("adaptflow.cli")

DEMO_DATASET_HELP = "which demo target: " + ", ".join(TARGET_TREES)
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override: section.key=value (repeatable)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="retrain even if data and config equal the champion's")
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"adaptflow {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="show the version")
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    setup_logging(log_level.upper())


def _emit(data: Any, as_json: bool, render: Any = None) -> None:
    if as_json or render is None:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="folder to write source/, target/ and target-shifted/ into")],
    size: Annotated[int, typer.Option(help="image side in pixels")] = 32,
    limit_per_class: Annotated[int | None, typer.Option(help="keep at most N images per digit")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write ImageFolder demo trees built from scikit-learn's handwritten digits (no network)."""
    from adaptflow.data.demo import write_demo_data

    data = write_demo_data(out, size=size, limit_per_class=limit_per_class)
    _emit({"root": str(data.root), "counts": data.counts}, as_json)


@app.command()
def pretrain(
    data: Annotated[Path, typer.Option(help="ImageFolder of the source task")],
    out: Annotated[Path, typer.Option(help="weights file to write (.safetensors or .pth)")],
    backbone: Annotated[str, typer.Option(help="torchvision architecture")] = "resnet18",
    epochs: int = 8,
    input_size: int = 32,
    seed: int = 0,
    as_json: JsonOpt = False,
) -> None:
    """Pretrain a backbone on a source task; writes weights + <file>.json (sha256, preprocessing)."""
    from adaptflow.training.pretrain import pretrain as run_pretrain

    result = run_pretrain(data, backbone, out, epochs=epochs, input_size=input_size, seed=seed)
    _emit(
        {
            "weights": str(result.weights_path),
            "sha256": result.sha256,
            "source_val_accuracy": result.source_val_accuracy,
            "source_test_accuracy": result.source_test_accuracy,
            "seconds": round(result.seconds, 1),
        },
        as_json,
    )


def _check_demo_dataset(name: str) -> None:
    if name not in TARGET_TREES:
        raise typer.BadParameter(f"--dataset must be one of {', '.join(TARGET_TREES)}, not {name!r}")


def _run_and_report(
    data_uri: str, config: Path | None, overrides: list[str], as_json: bool, force: bool = False
) -> dict[str, Any]:
    from adaptflow.config import load_settings
    from adaptflow.pipelines.local import run_local
    from adaptflow.tracking import stage_timings

    settings = load_settings(config, overrides)  # validation happens before any work
    settings = load_settings(config, [*overrides, f"workdir={Path(settings.workdir).resolve()}"])
    summary = run_local(settings, data_uri, force=force)
    summary["stage_seconds"] = stage_timings(summary["mlflow"]["tracking_uri"], summary["mlflow"]["run_id"])
    _emit(summary, as_json, _print_summary if summary["status"] == "completed" else _print_unchanged)
    return summary


@app.command()
def run(
    data: Annotated[str, typer.Option(help="ImageFolder dir, s3://bucket/prefix, or a .csv/.jsonl manifest")],
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Run the whole DAG on one machine through kfp.local (embedded MLflow unless MLFLOW_TRACKING_URI is set)."""
    _run_and_report(data, config, overrides or [], as_json, force)


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option(help="where demo data, weights and the embedded MLflow live")
    ] = Path(".adaptflow"),
    dataset: Annotated[str, typer.Option(help=DEMO_DATASET_HELP)] = "target",
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """The main job: demo data + pretrained source backbone (made once, cached), then the full DAG."""
    from adaptflow.demo import prepare_demo

    _check_demo_dataset(dataset)
    assets = prepare_demo(workdir.resolve())
    base = [
        f"workdir={workdir.resolve()}",
        f"backbone.weights_uri={assets.weights_uri}",
        f"backbone.sha256={assets.sha256}",
    ]
    _run_and_report(str(assets.data / dataset), config, base + (overrides or []), as_json, force)


@app.command("compile")
def compile_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="IR YAML to write")],
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    image: Annotated[
        str | None, typer.Option(help="component image (default: cluster.image or the release image)")
    ] = None,
    fingerprint: Annotated[
        str | None,
        typer.Option(help="data fingerprint known now: pinned into each cacheable task's cache key"),
    ] = None,
) -> None:
    """Compile the pipeline to KFP IR YAML (every cluster.* setting lands in it)."""
    from adaptflow.config import load_settings
    from adaptflow.pipelines import compile_pipeline

    path = compile_pipeline(load_settings(config, overrides or []), output, image, fingerprint)
    typer.echo(str(path))


@config_app.command("show")
def config_show(config: ConfigOpt = None, overrides: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Print the resolved configuration (defaults, then the file, then --set)."""
    from adaptflow.config import dump_settings, load_settings

    settings = load_settings(config, overrides or [])
    typer.echo(json.dumps(settings.model_dump(mode="json"), indent=2) if as_json else dump_settings(settings))


@app.command()
def backbones() -> None:
    """List the backbones the model factory knows."""
    from adaptflow.models import list_backbones

    typer.echo("\n".join(list_backbones()))


def _tracking_uri(config: Path | None, overrides: list[str]) -> tuple[Any, str]:
    from adaptflow.config import load_settings
    from adaptflow.tracking import check_tracking_reachable, resolve_tracking_uri

    settings = load_settings(config, overrides)
    uri = resolve_tracking_uri(settings)
    check_tracking_reachable(uri)
    return settings, uri


@app.command()
def history(
    model: Annotated[
        str | None, typer.Option(help="registered model name (default: registry.model_name)")
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the champion audit trail: every promotion and rollback."""
    from adaptflow.registry import read_audit

    settings, uri = _tracking_uri(config, overrides or [])
    trail = read_audit(uri, model or settings.registry.model_name)

    def render(rows: list[dict[str, Any]]) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"champion history of {model or settings.registry.model_name}")
        for col in ("time", "action", "from", "to", "accuracy", "reason"):
            table.add_column(col)
        for r in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["time"]))
            acc = r.get("metrics", {}).get("accuracy")
            table.add_row(
                when,
                r["action"],
                str(r.get("previous_champion") or "-"),
                str(r["new_champion"]),
                f"{acc:.4f}" if acc is not None else "",
                r["reason"][:120],
            )
        Console().print(table)

    _emit(trail, as_json, render)


@app.command()
def rollback(
    model: Annotated[
        str | None, typer.Option(help="registered model name (default: registry.model_name)")
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="version to make champion (default: the previous one)")
    ] = None,
    reason: Annotated[str, typer.Option(help="why, for the audit trail")] = "",
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move `champion` back one step along the audit trail (or to --to), under the promotion lease."""
    import mlflow

    from adaptflow.registry import lease_for
    from adaptflow.registry import rollback as do_rollback
    from adaptflow.tracking import ensure_experiment

    settings, uri = _tracking_uri(config, overrides or [])
    name = model or settings.registry.model_name
    client = mlflow.MlflowClient(uri)
    experiment_id = ensure_experiment(uri, settings.tracking.experiment, settings.workdir)
    run = client.create_run(experiment_id, run_name=f"rollback {name}", tags={"adaptflow.stage": "rollback"})
    artifacts = client.get_experiment(experiment_id).artifact_location
    lease = lease_for(name, settings.registry, settings.workdir, uri, artifacts)
    try:
        record = do_rollback(uri, name, lease, to, run.info.run_id, reason)
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id)
    _emit(record.__dict__, as_json)


@app.command()
def predict(
    paths: Annotated[list[str], typer.Argument(help="image files or folders")],
    model: Annotated[
        str, typer.Option(help="models:/NAME@champion, models:/NAME/VERSION or a .onnx file")
    ] = "",
    output_format: Annotated[str, typer.Option("--format", help="table, json or csv")] = "table",
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
    fmt = "json" if as_json else output_format
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=["path", "label", "confidence", "error"])
        writer.writeheader()
        writer.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"predictions ({model or 'champion'})")
        for col in ("path", "label", "confidence"):
            table.add_column(col)
        for r in rows:
            table.add_row(
                r["path"],
                r["label"] or f"[red]{r['error']}",
                f"{r['confidence']:.3f}" if r["confidence"] else "",
            )
        Console().print(table)


schedule_app = typer.Typer(help="Recurring runs on a Kubeflow Pipelines cluster.", no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")
HostOpt = Annotated[
    str, typer.Option("--host", help="KFP API endpoint, e.g. http://localhost:8080 (port-forward)")
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", help="bearer token (default: $KFP_TOKEN, the KFP SA token file, or kube config)"),
]
NamespaceOpt = Annotated[str | None, typer.Option("--namespace", help="KFP multi-user namespace")]
ExperimentOpt = Annotated[str, typer.Option("--experiment", help="KFP experiment")]


def _cluster_parameters(data: str, settings: Any, force: bool, version: str) -> dict[str, Any]:
    return {"data_uri": data, "config_json": settings.to_json(), "force": force, "pipeline_version": version}


@app.command()
def submit(
    host: HostOpt,
    data: Annotated[str, typer.Option(help="data URI the cluster can read, e.g. s3://bucket/prefix")],
    experiment: ExperimentOpt = "adaptflow",
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    run_name: Annotated[str | None, typer.Option(help="KFP run name")] = None,
    version_name: Annotated[
        str | None, typer.Option(help="pipeline version name (default: time + hash)")
    ] = None,
    token: TokenOpt = None,
    namespace: NamespaceOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compile, upload a pipeline version and start a run on a Kubeflow Pipelines cluster."""
    import tempfile

    from adaptflow.config import load_settings
    from adaptflow.kfp_client import default_version_name, resolve_token
    from adaptflow.kfp_client import submit as kfp_submit
    from adaptflow.pipelines import PIPELINE_NAME, compile_pipeline

    settings = load_settings(config, overrides or [])
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(settings, Path(tmp) / "adaptflow.yaml")
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
    _emit(result.to_dict(), as_json)


@schedule_app.command("create")
def schedule_create(
    host: HostOpt,
    cron: Annotated[str, typer.Option(help="6-field cron, seconds first: '0 0 3 * * 1' = Mondays 03:00")],
    data: Annotated[str, typer.Option(help="data URI the cluster can read, e.g. s3://bucket/prefix")],
    name: Annotated[str, typer.Option("--name", help="recurring run name")] = "adaptflow-retrain",
    experiment: ExperimentOpt = "adaptflow",
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    max_concurrency: Annotated[int, typer.Option(help="runs allowed at once")] = 1,
    catchup: Annotated[bool, typer.Option("--catchup/--no-catchup", help="backfill missed runs")] = False,
    replace: Annotated[bool, typer.Option(help="replace a schedule of the same name")] = False,
    token: TokenOpt = None,
    namespace: NamespaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Schedule retraining with the latest uploaded pipeline version (upload one with `adaptflow submit`)."""
    from adaptflow.config import load_settings
    from adaptflow.kfp_client import create_schedule, resolve_token
    from adaptflow.pipelines import PIPELINE_NAME

    settings = load_settings(config, overrides or [])
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
    _emit({"recurring_run_id": recurring_id, "name": name, "cron": cron}, as_json)


@schedule_app.command("list")
def schedule_list(
    host: HostOpt,
    experiment: Annotated[str | None, typer.Option(help="only this experiment")] = None,
    token: TokenOpt = None,
    namespace: NamespaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List recurring runs."""
    from adaptflow.kfp_client import list_schedules, resolve_token

    rows = [
        s.to_dict()
        for s in list_schedules(host, experiment, namespace=namespace, existing_token=resolve_token(token))
    ]

    def render(items: list[dict[str, Any]]) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="schedules")
        for col in ("recurring_run_id", "name", "cron", "enabled", "max_concurrency", "no_catchup"):
            table.add_column(col)
        for r in items:
            table.add_row(
                *(
                    str(r.get(c))
                    for c in ("recurring_run_id", "name", "cron", "enabled", "max_concurrency", "no_catchup")
                )
            )
        Console().print(table)

    _emit(rows, as_json, render)


@schedule_app.command("delete")
def schedule_delete(
    host: HostOpt,
    recurring_run_id: Annotated[str, typer.Argument(help="id from `adaptflow schedule list`")],
    token: TokenOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Delete a recurring run."""
    from adaptflow.kfp_client import delete_schedule, resolve_token

    delete_schedule(host, recurring_run_id, namespace=namespace, existing_token=resolve_token(token))
    typer.echo(f"deleted {recurring_run_id}")


def _print_unchanged(s: dict[str, Any]) -> None:
    from rich.console import Console

    Console().print(
        f"[yellow]unchanged[/]: {s['reason']}\nchampion: v{s['champion_before']}  run {s['mlflow']['run_id']}"
    )


@app.command()
def compare(
    data: Annotated[
        str | None, typer.Option(help="ImageFolder dir, s3://bucket/prefix, or a .csv/.jsonl manifest")
    ] = None,
    strategies: Annotated[
        str, typer.Option(help="comma-separated: linear_probe,partial,full,lora,gradual,scratch")
    ] = "linear_probe,partial,full,lora,gradual",
    demo: Annotated[
        bool,
        typer.Option(
            "--demo", help="use the demo assets (data + source backbone, made once under the workdir)"
        ),
    ] = False,
    dataset: Annotated[str, typer.Option(help="with --demo: " + DEMO_DATASET_HELP)] = "target",
    train_per_class: Annotated[
        int | None, typer.Option(help="keep N training images per class (the few-images condition)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default: <workdir>/compare)")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Transfer learning vs each fine-tuning strategy on one snapshot and one test split; HTML + Markdown report."""
    from adaptflow.compare import parse_strategies, run_compare
    from adaptflow.config import load_settings

    names = parse_strategies(strategies)
    extra = list(overrides or [])
    settings = load_settings(config, extra)  # validation happens before any work
    workdir = Path(settings.workdir).resolve()
    if demo:
        from adaptflow.demo import prepare_demo

        _check_demo_dataset(dataset)
        assets = prepare_demo(workdir)
        extra = [f"backbone.weights_uri={assets.weights_uri}", f"backbone.sha256={assets.sha256}", *extra]
        data = str(assets.data / dataset)
    if data is None:
        raise typer.BadParameter("pass --data DIR, or --demo [--dataset target-shifted]")
    settings = load_settings(config, [*extra, f"workdir={workdir}"])
    result = run_compare(data, settings, names, out or workdir / "compare", train_per_class=train_per_class)

    def render(r: Any) -> None:
        from rich.console import Console
        from rich.table import Table

        from adaptflow.report import table_rows

        rows = table_rows(r)
        table = Table(title=f"transfer learning vs fine-tuning: {r.data_uri}")
        for col in rows[0]:
            table.add_column(col, justify="left" if col == "strategy" else "right")
        for row in rows[1:]:
            table.add_row(*row)
        console = Console()
        console.print(table)
        console.print(f"[bold]best[/]: {r.best}: {r.best_reason}")
        console.print(f"[bold]advisor[/]: {r.decision.reason}")
        console.print(f"[bold]report[/]: {r.report_html}\n        {r.report_markdown}")
        console.print(f"[bold]mlflow[/]: {r.tracking_uri}  run {r.run_id}")

    _emit(result.model_dump(mode="json") if as_json else result, as_json, render)


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    table = Table(title="adaptflow run", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    d = s["dataset"]
    table.add_row(
        "data",
        f"{d['source']}\nfingerprint {d['fingerprint'][:16]}  counts {d['counts']}  quarantined {len(d['quarantined'])}",
    )
    b = s["baseline"]["metrics"]
    table.add_row(
        "baseline (transfer)",
        f"test accuracy {pct(b['accuracy'])}  CI95 {b['accuracy_ci95'][0]:.3f}-{b['accuracy_ci95'][1]:.3f}  macro-F1 {pct(b['macro_f1'])}",
    )
    f = s["finetune"]
    if f["ran"]:
        m = f["metrics"]
        table.add_row(
            f"finetune ({f['strategy']})",
            f"test accuracy {pct(m['accuracy'])}  CI95 {m['accuracy_ci95'][0]:.3f}-{m['accuracy_ci95'][1]:.3f}  macro-F1 {pct(m['macro_f1'])}",
        )
    table.add_row("advisor", s["advisor"]["reason"])
    table.add_row("winner", f"{s['winner']}: {s['winner_reason']}")
    table.add_row(
        "champion before",
        f"v{s['champion_before']} ({pct(s['champion_before_accuracy'])})" if s["champion_before"] else "none",
    )
    table.add_row("registered", f"{s['model_uri']}")
    verdict = "[green]PROMOTED to champion" if s["promoted"] else "[yellow]not promoted"
    table.add_row("gate", verdict + "\n" + "\n".join(f"- {r}" for r in s["gate"]["reasons"]))
    o = s["onnx"]
    table.add_row(
        "onnx",
        f"max |ort - torch| {o['max_abs_diff']:.2e} (tol {o['tolerance']:.0e}), p50 {o['latency_ms_p50']:.2f} ms",
    )
    table.add_row("mlflow", f"{s['mlflow']['tracking_uri']}  run {s['mlflow']['run_id']}")
    if s.get("stage_seconds"):
        table.add_row("stage seconds", "  ".join(f"{k} {v:.1f}" for k, v in s["stage_seconds"].items()))
    Console().print(table)


def main() -> None:
    # MLflow writes "View run at ..." lines to stdout for tracking servers; stdout is for --json.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        app()
    except (AdaptflowError, OSError) as error:
        from adaptflow.steps import describe_error

        message, hint = describe_error(error)
        if isinstance(error, OSError) and hint is None:
            raise  # an unexpected OS error keeps its traceback
        logging.getLogger("adaptflow").error("%s", message)
        typer.echo(f"error: {message}", err=True)
        if hint:
            typer.echo(f"hint: {hint}", err=True)
        sys.exit(error.exit_code if isinstance(error, AdaptflowError) else 2)


if __name__ == "__main__":
    main()
