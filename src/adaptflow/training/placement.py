"""Where the finetune stage trains when one process is not enough (``cluster.finetune``).

- ``nodes > 1``: a Kubeflow Trainer job (or a PyTorchJob) of ``nodes`` x ``gpus`` processes, submitted and
  followed from the finetune task's pod (:mod:`adaptflow.trainjob`);
- ``gpus > 1``: ``gpus`` torchrun processes in this pod (:func:`~adaptflow.training.distributed.launch_on_this_node`);
- otherwise, and inside a torchrun worker: this process trains, as before.
"""

from __future__ import annotations

from pathlib import Path

from adaptflow.config import Settings
from adaptflow.errors import ConfigError


def train_elsewhere(
    settings: Settings,
    *,
    snapshot_dir: str,
    baseline_dir: str,
    config_json: str,
    parent_run_id: str,
    fingerprint: str,
    out_dir: str,
) -> bool:
    """Runs the finetune on other processes when ``cluster.finetune`` asks for it; False: train here."""
    from adaptflow.training.distributed import launch_on_this_node, torchrun_world

    scaling = settings.cluster.finetune
    if torchrun_world().distributed or (scaling.nodes == 1 and scaling.gpus == 1):
        return False
    if scaling.nodes > 1:
        from adaptflow.trainjob import submit_and_wait

        if not settings.cluster.image:  # the job's pods run the component's own image, never a guess
            raise ConfigError(
                "cluster.finetune.nodes > 1 needs cluster.image: the Trainer job's pods run it",
                hint="compile with --image or set cluster.image to the image the pipeline runs",
            )
        submit_and_wait(
            settings,
            snapshot_dir=snapshot_dir,
            baseline_dir=baseline_dir,
            config_json=config_json,
            parent_run_id=parent_run_id,
            fingerprint=fingerprint,
            out_dir=out_dir,
            image=settings.cluster.image,
        )
        return True
    config_file = config_json
    if config_json.lstrip().startswith("{"):  # the workers read a file, never a long command line
        config_file = str(Path(out_dir).parent / "finetune-config.json")
        Path(config_file).write_text(config_json)
    worker_argv = ["--snapshot-dir", snapshot_dir, "--baseline-dir", baseline_dir]
    worker_argv += ["--config-json-file", config_file, "--parent-run-id", parent_run_id]
    worker_argv += ["--fingerprint", fingerprint, "--out-dir", out_dir]
    launch_on_this_node(scaling.gpus, worker_argv)
    return True
