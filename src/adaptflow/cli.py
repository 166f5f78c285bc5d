"""The ``adaptflow`` command: a thin shell over the library (all logic lives in ``adaptflow.*``).

Every command parses its options, loads the settings once, calls one library function and prints
the result: ``--json`` as JSON, otherwise what ``adaptflow.render`` builds from it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from typer.exceptions import TyperException

from adaptflow import __version__, render
from adaptflow.cli_cluster import schedule_app, submit
from adaptflow.cli_registry import history, predict, rollback
from adaptflow.cli_shared import (
    OUTPUT,
    ConfigOpt,
    DataOpt,
    ForceOpt,
    JsonOpt,
    PlainArgumentsCommand,
    SetOpt,
    component_image,
    emit,
    fail,
    load,
    usage_error,
)
from adaptflow.cpus import use_openmp_defaults
from adaptflow.demo import TARGET_TREES
from adaptflow.logs import LEVELS, setup_logging

if TYPE_CHECKING:
    from adaptflow.config import Settings

app = typer.Typer(
    name="adaptflow",
    help="Adapt pretrained vision backbones to your images: transfer learning first, fine-tuning when it pays.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: flags without "<bool>", metavars as written
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(config_app, name="config")
app.add_typer(schedule_app, name="schedule")
log = logging.getLogger("adaptflow.cli")

DEMO_DATASET_HELP = "which demo target: " + ", ".join(TARGET_TREES)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"adaptflow {__version__}")
        raise typer.Exit()


def _check_level(value: str) -> str:
    if value.upper() not in LEVELS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(LEVELS)}")
    return value.upper()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="show the version")
    ] = False,
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level",
            metavar="LEVEL",
            callback=_check_level,
            help=f"{', '.join(LEVELS)}: the lowest level logged (to a run's log file; on the terminal with -v)",
        ),
    ] = "INFO",
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="every log line on the terminal, the stages' too")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error")] = False,
) -> None:
    OUTPUT["debug"] = debug
    setup_logging(log_level.upper(), verbose=verbose or debug)


def _check_demo_dataset(name: str) -> None:
    if name not in TARGET_TREES:
        raise typer.BadParameter(f"--dataset must be one of {', '.join(TARGET_TREES)}, not {name!r}")


def _with_demo_assets(
    settings: Settings, workdir: Path, dataset: str, overrides: list[str]
) -> tuple[Settings, str]:
    """Makes the demo data and source backbone under ``workdir`` (once, cached); returns the settings
    that train from that backbone, and the demo dataset's folder.

    The demo backbone ranks where a ``--set`` written before the user's own would: above the config
    file, below the user's ``--set backbone...``.
    """
    from adaptflow.config import parse_override
    from adaptflow.demo import prepare_demo

    assets = prepare_demo(workdir)
    chosen = {".".join(parse_override(o)[0]) for o in overrides}
    demo = {"weights_uri": assets.weights_uri, "sha256": assets.sha256}
    update = {key: value for key, value in demo.items() if not {"backbone", f"backbone.{key}"} & chosen}
    backbone = settings.backbone.model_copy(update=update)
    return settings.model_copy(update={"backbone": backbone}), str(assets.data / dataset)


@app.command("demo-data", cls=PlainArgumentsCommand)
def demo_data(
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="folder to write source/, target/ and target-shifted/ into")
    ],
    size: Annotated[int, typer.Option(metavar="PX", help="image side in pixels")] = 32,
    limit_per_class: Annotated[
        int | None, typer.Option(metavar="N", help="keep at most N images per digit")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write ImageFolder demo trees built from scikit-learn's handwritten digits (no network)."""
    from adaptflow.data.demo import write_demo_data

    data = write_demo_data(out, size=size, limit_per_class=limit_per_class)
    emit({"root": str(data.root), "counts": data.counts}, as_json)


@app.command()
def pretrain(
    data: Annotated[Path, typer.Option(metavar="DIR", help="ImageFolder of the source task")],
    out: Annotated[Path, typer.Option(metavar="FILE", help="weights file to write (.safetensors or .pth)")],
    backbone: Annotated[str, typer.Option(metavar="NAME", help="torchvision architecture")] = "resnet18",
    epochs: Annotated[int, typer.Option(metavar="N", help="training epochs")] = 8,
    input_size: Annotated[int, typer.Option(metavar="PX", help="input size")] = 32,
    seed: Annotated[int, typer.Option(metavar="N", help="random seed")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Pretrain a backbone on a source task; writes weights + <file>.json (sha256, preprocessing).

    Under ``torchrun --nproc-per-node N -m adaptflow.cli pretrain ...`` it trains with DDP; rank 0 writes
    the weights and prints the result.
    """
    from adaptflow.training.distributed import torchrun_world
    from adaptflow.training.pretrain import pretrain as run_pretrain

    result = run_pretrain(data, backbone, out, epochs=epochs, input_size=input_size, seed=seed)
    if not torchrun_world().is_main:
        return
    emit(
        {
            "weights": str(result.weights_path),
            "sha256": result.sha256,
            "source_val_accuracy": result.source_val_accuracy,
            "source_test_accuracy": result.source_test_accuracy,
            "seconds": round(result.seconds, 1),
        },
        as_json,
    )


def _run_and_report(data_uri: str, settings: Settings, as_json: bool, force: bool) -> None:
    from adaptflow.pipelines.local import run_local
    from adaptflow.tracking import stage_timings

    summary = run_local(settings, data_uri, force=force)
    summary["stage_seconds"] = stage_timings(summary["mlflow"]["tracking_uri"], summary["mlflow"]["run_id"])
    emit(summary, as_json, render.run_view)


@app.command()
def run(
    data: DataOpt,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Run the whole DAG on one machine through kfp.local (embedded MLflow unless MLFLOW_TRACKING_URI is set)."""
    _run_and_report(data, load(config, overrides or [], absolute_workdir=True), as_json, force)


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option(metavar="DIR", help="where demo data, weights and the embedded MLflow live")
    ] = Path(".adaptflow"),
    dataset: Annotated[str, typer.Option(metavar="NAME", help=DEMO_DATASET_HELP)] = "target",
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """The main job: demo data + pretrained source backbone (made once, cached), then the full DAG."""
    _check_demo_dataset(dataset)
    home = workdir.resolve()
    settings = load(config, [f"workdir={home}", *(overrides or [])], absolute_workdir=True)
    settings, data = _with_demo_assets(settings, home, dataset, overrides or [])
    _run_and_report(data, settings, as_json, force)


@app.command("compile")
def compile_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="IR YAML to write")],
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    image: Annotated[
        str | None,
        typer.Option(metavar="IMAGE", help="component image (default: cluster.image; one is required)"),
    ] = None,
    fingerprint: Annotated[
        str | None,
        typer.Option(
            metavar="SHA256", help="data fingerprint known now: pinned into each cacheable task's cache key"
        ),
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="compile the strategy comparison DAG (`adaptflow compare`)")
    ] = False,
) -> None:
    """Compile the pipeline to KFP IR YAML (every cluster.* setting lands in it)."""
    from adaptflow.pipelines import compile_pipeline
    from adaptflow.pipelines.compare import compile_compare_pipeline

    settings = load(config, overrides or [])
    image = component_image(settings, image)
    if compare:
        path = compile_compare_pipeline(settings, output, image)
    else:
        path = compile_pipeline(settings, output, image, fingerprint)
    typer.echo(str(path))


@config_app.command("show")
def config_show(config: ConfigOpt = None, overrides: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Print the resolved configuration (defaults, then the file, then --set), each key's type and
    description as a YAML comment."""
    from adaptflow.config_describe import describe_settings

    settings = load(config, overrides or [])
    typer.echo(
        json.dumps(settings.model_dump(mode="json"), indent=2) if as_json else describe_settings(settings)
    )


@app.command("gc")
def gc_cmd(
    keep_runs: Annotated[
        int,
        typer.Option(
            min=0, metavar="N", help="keep the N newest kfp-local/ and runs/ folders (each); older ones go"
        ),
    ] = 5,
    older_than: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="DAYS",
            help="remove cache/decoded, cache/features and checkpoints/ entries not modified for DAYS days",
        ),
    ] = 7,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would go; remove nothing")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove old local scratch under the workdir and show what it frees.

    Never touched: mlflow.db, mlartifacts/, cache/weights/, configs/, anything modified within the last
    hour (a run may be active), and anything a symlink leads to.
    """
    from adaptflow.cleanup import collect_garbage, gc_view

    settings = load(config, overrides or [])
    result = collect_garbage(settings.workdir, keep_runs, older_than, dry_run)
    emit(result.as_dict(), as_json, gc_view)


@app.command()
def backbones(as_json: JsonOpt = False) -> None:
    """List the backbones the model factory knows."""
    from adaptflow.models import list_backbones

    names = list(list_backbones())
    if as_json:
        typer.echo(json.dumps(names))
    else:
        typer.echo("\n".join(names))


app.command()(submit)  # defined with the other cluster commands in cli_cluster
for command in (history, rollback):  # the registry commands, in cli_registry
    app.command()(command)
app.command(cls=PlainArgumentsCommand)(predict)


@app.command()
def compare(
    data: Annotated[
        str | None,
        typer.Option(
            metavar="PATH|URI", help="ImageFolder dir, s3://bucket/prefix, or a .csv/.jsonl manifest"
        ),
    ] = None,
    strategies: Annotated[
        str,
        typer.Option(metavar="LIST", help="comma-separated: linear_probe,partial,full,lora,gradual,scratch"),
    ] = "linear_probe,partial,full,lora,gradual",
    demo: Annotated[
        bool,
        typer.Option(
            "--demo", help="use the demo assets (data + source backbone, made once under the workdir)"
        ),
    ] = False,
    dataset: Annotated[
        str, typer.Option(metavar="NAME", help="with --demo: " + DEMO_DATASET_HELP)
    ] = "target",
    train_per_class: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="keep N training images per class (the few-images condition; = --set ingest.train_per_class=N)",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(metavar="DIR", help="output folder (default: <workdir>/compare)")
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Transfer learning vs each fine-tuning strategy on one snapshot and one test split; HTML + Markdown report."""
    from adaptflow.compare import parse_strategies
    from adaptflow.pipelines.local import run_compare_local

    names = parse_strategies(strategies)
    if train_per_class is not None:
        overrides = [*(overrides or []), f"ingest.train_per_class={train_per_class}"]
    settings = load(config, overrides or [], absolute_workdir=True)
    workdir = Path(settings.workdir)
    if demo:
        _check_demo_dataset(dataset)
        settings, data = _with_demo_assets(settings, workdir, dataset, overrides or [])
    if data is None:
        raise typer.BadParameter("pass --data DIR, or --demo [--dataset target-shifted]")
    result = run_compare_local(settings, data, names, out or workdir / "compare")
    emit(result.model_dump(mode="json") if as_json else result, as_json, render.compare_view)


def main() -> None:
    # MLflow writes "View run at ..." lines to stdout for tracking servers; stdout is for --json.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    use_openmp_defaults()  # before any command imports torch: libgomp reads them once, at load
    try:
        # not standalone: click's own usage errors come here too, to be printed like every other error
        status = app(standalone_mode=False)
        if isinstance(status, int) and status:
            sys.exit(status)
    except typer.Abort:
        sys.exit(130)
    except TyperException as error:  # typer's click: a usage error (unknown option, bad value)
        fail(usage_error(error))
    except Exception as error:
        fail(error)  # one error: line and hint: (and --json's error object), or the traceback of a bug
    finally:
        # the process ends here: its exit need not garbage-collect torch, mlflow and kfp (~1 s)
        gc.freeze()


if __name__ == "__main__":
    main()
