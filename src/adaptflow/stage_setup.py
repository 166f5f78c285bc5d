"""Every stage process's prologue: logging, the run's settings, and the pipeline run to nest under.

Apart from ``steps.py`` so that a torchrun worker (``training/finetune_worker.py``) opens its stage the
same way without importing the steps, which import it.
"""

from __future__ import annotations

import sys

from adaptflow.config import Settings
from adaptflow.cpus import configure_threads
from adaptflow.logs import setup_logging
from adaptflow.tracking import TrackingContext, resolve_tracking_uri, store_errors


def _in_component_process() -> bool:
    """True in the process KFP starts for a component (``python -m kfp.dsl.executor_main``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "kfp.dsl.executor_main"


def stage_settings(config_json: str, *, uses_torch: bool) -> Settings:
    """The run's settings from ``config_json``: the JSON itself, or the URI of a JSON file.

    Local runs pass a file (:func:`adaptflow.pipelines.local.write_run_config`), so the config never
    sits on a stage's command line, where a large one fails with "Argument list too long". A stage
    that ``uses_torch`` gets torch's threads sized to the pod's CPUs; the others never import torch
    (about 1.5 s per stage process).
    """
    setup_logging(exclusive=_in_component_process())
    if config_json.lstrip().startswith("{"):
        settings = Settings.from_json(config_json)
    else:
        from adaptflow.storage import read_bytes

        settings = Settings.from_json(read_bytes(config_json).decode())
    if uses_torch:
        configure_threads(settings.threads)  # a pod's CPU quota, not the node's cores
    return settings


def open_stage(config_json: str, parent_run_id: str, *, uses_torch: bool) -> tuple[Settings, TrackingContext]:
    """Every step's prologue: logging, the run's settings, and the pipeline run to nest under."""
    settings = stage_settings(config_json, uses_torch=uses_torch)
    return settings, stage_context(settings, parent_run_id)


def stage_context(settings: Settings, parent_run_id: str) -> TrackingContext:
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(settings)
    with store_errors(uri):  # a store that broke since the run began: one line and a hint
        experiment_id = MlflowClient(uri).get_run(parent_run_id).info.experiment_id
    return TrackingContext(uri, str(experiment_id), parent_run_id)
