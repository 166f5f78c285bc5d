"""One process of distributed fine-tuning: what the finetune stage does, as one torchrun rank.

Started N times by :func:`adaptflow.training.distributed.launch_on_this_node` (``cluster.finetune.gpus``
> 1), by ``torchrun``, or by a Kubeflow Trainer job. Every rank trains its share of each batch; rank 0
alone opens the stage's nested MLflow run, logs to it, and writes the checkpoint and the candidate.

    python -m adaptflow.training.finetune_worker --snapshot-dir D --baseline-dir D \
        --config-json-file F --parent-run-id ID --fingerprint FP --out-dir D
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adaptflow.config import Settings
    from adaptflow.tracking import TrackingContext

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m adaptflow.training.finetune_worker", description=__doc__)
    parser.add_argument("--snapshot-dir", required=True)
    parser.add_argument("--baseline-dir", required=True)
    parser.add_argument("--config-json-file", required=True, help="the run's settings (a path or URI)")
    parser.add_argument("--parent-run-id", required=True, help="the pipeline's MLflow run to nest under")
    parser.add_argument("--fingerprint", required=True, help="the snapshot's data fingerprint")
    parser.add_argument("--out-dir", required=True, help="where rank 0 writes the candidate")
    return parser.parse_args(argv)


def run_worker(args: argparse.Namespace) -> None:
    from adaptflow.cpus import cpu_budget
    from adaptflow.stage_setup import open_stage
    from adaptflow.training.distributed import torchrun_world

    settings, ctx = open_stage(args.config_json_file, args.parent_run_id, uses_torch=True)
    import torch

    # the pod's CPUs are shared by its N processes (spinning threads cost 5x: DESIGN.md, "Fit the pod")
    torch.set_num_threads(
        max(1, (settings.threads or cpu_budget().cpus) // torchrun_world().local_world_size)
    )
    train_finetune(settings, ctx, args.snapshot_dir, args.baseline_dir, args.fingerprint, args.out_dir)


def train_finetune(
    settings: Settings,
    ctx: TrackingContext,
    snapshot_dir: str,
    baseline_dir: str,
    fingerprint: str,
    out_dir: str,
) -> None:
    """The finetune stage's work in this process: alone (the stage itself) or as one torchrun rank.

    Rank 0 alone opens the nested MLflow run, logs to it and writes the candidate.
    """
    import mlflow

    from adaptflow.contracts import BaselineResult, Snapshot
    from adaptflow.signals import stop_on_sigterm
    from adaptflow.stage_logs import log_candidate
    from adaptflow.tracking import flat_params, stage_run
    from adaptflow.training.advisor import finetune_settings
    from adaptflow.training.checkpoint import finetune_checkpointer
    from adaptflow.training.decoded import decoded_cache_dir
    from adaptflow.training.distributed import training_world
    from adaptflow.training.finetune import FinetuneInputs, run_finetune
    from adaptflow.training.runtime import pick_device

    baseline = BaselineResult.load(baseline_dir)
    cfg = finetune_settings(settings.finetune, baseline.decision, settings.baseline.advisor)
    # the same data, config and strategy find the same checkpoint: a rerun or a retried task resumes
    checkpointer = finetune_checkpointer(settings, cfg, fingerprint, Path(out_dir))
    with training_world(pick_device(cfg.device)) as (world, _):
        tags = {"adaptflow.data_fingerprint": fingerprint, "adaptflow.strategy": cfg.strategy}
        if world.distributed:
            tags["adaptflow.processes"] = str(world.world_size)
        tracked = stage_run(ctx, "finetune", tags) if world.is_main else contextlib.nullcontext()
        with tracked, stop_on_sigterm() as stop:
            if world.is_main:
                mlflow.log_params(flat_params("finetune", cfg.model_dump(mode="json")))
            inputs = FinetuneInputs(
                Snapshot.load(snapshot_dir),
                baseline,
                Path(baseline_dir) / "candidate",
                cfg,
                settings.seed,
                checkpointer,
                stop,
                decoded_cache_dir(settings),
            )
            candidate = run_finetune(inputs, out_dir)
            if world.is_main:
                log_candidate(candidate, Path(out_dir))


def main(argv: list[str] | None = None) -> int:
    """Runs one rank; 0 on success, else the stage exit status that says whether a retry can help.

    A failure is also written to torch elastic's error file (``TORCHELASTIC_ERROR_FILE``), which the
    launcher reads to name the failed rank and its message.
    """
    from adaptflow.errors import describe_error, exit_status
    from adaptflow.signals import stop_with_parent

    args = parse_args(argv)
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        stop_with_parent()  # the launching agent killed outright still stops this rank (SIGTERM)
    try:
        run_worker(args)
    except Exception as error:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        message, hint = describe_error(error)
        rank = os.environ.get("RANK", "0")
        log.error("finetune rank %s failed: %s%s", rank, message, f" (hint: {hint})" if hint else "")
        handler = get_error_handler()
        handler.initialize()
        handler.record_exception(error)
        return exit_status(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
