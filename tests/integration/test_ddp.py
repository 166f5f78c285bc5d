"""Distributed fine-tuning: 2 processes on gloo (CPU) match one process at the same effective batch.

The 2-process runs go through :func:`launch_on_this_node` (torch's elastic launcher, rendezvous on
localhost) and the real worker entry point; the single-process reference is :func:`run_finetune` in
this process. Both train the same global batch per step: each rank takes half of it.

What makes the comparison honest:

- BatchNorm: per-rank batch statistics (4 images) are not the single process's (8), and
  SyncBatchNorm runs only on GPUs (torch 2.14 rejects CPU input). So ``finetune.freeze_bn=true``:
  every BatchNorm layer uses its running statistics, and a step's gradient is the same function of
  the batch in both runs; the loop averages the ranks' gradients, which equals the whole batch's mean.
- Augmentation is off: each rank draws its own augmentation, which no single process reproduces.
- ``partial`` strategy: frozen blocks and trainable ones, so DDP with frozen parameters is covered.
- The data order comes from the seed and the epoch (DistributedSampler), the same for 1 or 2 ranks.

What remains is float summation order (per-rank means, then their mean), which AdamW amplifies
where a gradient is tiny (it divides by the gradient's own scale), so after 3 epochs: weights (L2) within ``WEIGHT_FRACTION`` of the distance training moved them, metrics within ``METRIC_RTOL`` (relative). A resumed
2-process run repeats the uninterrupted one's arithmetic exactly, so it is held to ``RESUME_ATOL``.
"""

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.integration

EPOCHS = 3
WEIGHT_FRACTION = 0.1  # of the L2 distance training moved the weights
METRIC_RTOL = 2e-2
RESUME_ATOL = 1e-6
STOP_AFTER_STEPS = 20  # of about 15 per epoch: stops mid-epoch 2, after its mid-epoch checkpoint


def _settings(tiny_assets: Any, work: Path) -> Any:
    from adaptflow.config import load_settings

    return load_settings(
        overrides=[
            *tiny_assets.overrides(work),
            f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
            f"finetune.epochs={EPOCHS}",
            f"finetune.patience={EPOCHS}",
            "finetune.strategy=partial",
            "finetune.freeze_bn=true",
            "finetune.augment=false",
            "finetune.device=cpu",
            "finetune.checkpoint_every_steps=4",
            "baseline.advisor.choose_strategy=false",
            "threads=1",
        ]
    )


def _worker_args(case: "DdpCase", out: Path) -> list[str]:
    return [
        "--snapshot-dir", str(case.snapshot_dir),
        "--baseline-dir", str(case.baseline_dir),
        "--config-json-file", str(case.config_file),
        "--parent-run-id", case.parent_run_id,
        "--fingerprint", case.fingerprint,
        "--out-dir", str(out),
    ]  # fmt: skip


class DdpCase:
    def __init__(self, tiny_assets: Any, tiny_baseline: Any, work: Path) -> None:
        from mlflow.tracking import MlflowClient

        from adaptflow.tracking import ensure_experiment

        self.work = work
        self.settings = _settings(tiny_assets, work)
        self.snapshot_dir = work / "snapshot"
        tiny_baseline.snapshot.save(self.snapshot_dir)
        self.fingerprint = tiny_baseline.snapshot.fingerprint
        self.baseline_dir = tiny_baseline.work / "baseline"
        self.config_file = work / "config.json"
        self.config_file.write_text(self.settings.to_json())
        self.tracking_uri = self.settings.tracking.tracking_uri
        client = MlflowClient(self.tracking_uri)
        # artifacts under the work folder, not ./mlruns in the current directory
        self.experiment_id = ensure_experiment(self.tracking_uri, "ddp", work)
        self.parent_run_id = client.create_run(self.experiment_id, run_name="pipeline").info.run_id

    def stage_runs(self) -> list[Any]:
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri).search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}'"
        )


@pytest.fixture(scope="module")
def ddp_case(tiny_assets: Any, tiny_baseline: Any, tmp_path_factory: pytest.TempPathFactory) -> DdpCase:
    return DdpCase(tiny_assets, tiny_baseline, tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def two_process_run(ddp_case: DdpCase) -> Path:
    from adaptflow.training.distributed import launch_on_this_node

    out = ddp_case.work / "ddp" / "candidate"
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    launch_on_this_node(2, _worker_args(ddp_case, out))
    # the elastic agent's handlers must not outlive the launch: this process's own SIGTERM handling
    # (a stage's graceful stop; pytest's here) would otherwise become torch's SignalException
    assert {sig: signal.getsignal(sig) for sig in before} == before
    return out


def _single_process_run(case: DdpCase, out: Path) -> None:
    from adaptflow.contracts import BaselineResult, Snapshot
    from adaptflow.training.advisor import finetune_settings
    from adaptflow.training.finetune import FinetuneInputs, run_finetune

    baseline = BaselineResult.load(case.baseline_dir)
    settings = case.settings
    cfg = finetune_settings(settings.finetune, baseline.decision, settings.baseline.advisor)
    inputs = FinetuneInputs(
        Snapshot.load(case.snapshot_dir), baseline, case.baseline_dir / "candidate", cfg, settings.seed
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_finetune(inputs, out)
    finally:
        torch.set_num_threads(threads)


def _weights(candidate_dir: Path) -> dict[str, torch.Tensor]:
    from adaptflow.training.candidates import load_candidate

    return load_candidate(candidate_dir)[1].state_dict()


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance over every floating-point weight (AdamW turns float noise in a near-zero gradient
    into a whole step for that one weight, so the largest single difference says little)."""
    assert a.keys() == b.keys()
    return (
        sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point()) ** 0.5
    )


def test_two_processes_match_one_at_the_same_effective_batch(
    ddp_case: DdpCase, two_process_run: Path
) -> None:
    from adaptflow.contracts import Candidate

    single = ddp_case.work / "single" / "candidate"
    _single_process_run(ddp_case, single)
    ddp, one = Candidate.load(two_process_run), Candidate.load(single)
    assert len(ddp.history) == len(one.history) == EPOCHS
    for a, b in zip(ddp.history, one.history, strict=True):
        for field in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert getattr(a, field) == pytest.approx(getattr(b, field), rel=METRIC_RTOL), (a.epoch, field)
    assert ddp.extra["best_epoch"] == one.extra["best_epoch"]
    assert ddp.extra["batch_size"] == one.extra["batch_size"]  # the global batch, split in two
    ddp_weights, one_weights = _weights(two_process_run), _weights(single)
    apart = _distance(ddp_weights, one_weights)
    moved = _distance(one_weights, _weights(ddp_case.baseline_dir / "candidate"))
    # the runs agree to a small fraction of how far training moved the weights from the baseline's
    assert apart < WEIGHT_FRACTION * moved, (apart, moved)


def test_only_rank_zero_logs_and_writes(ddp_case: DdpCase, two_process_run: Path) -> None:
    runs = [r for r in ddp_case.stage_runs() if r.info.run_name == "finetune"]
    assert len(runs) == 1, "one nested stage run, from rank 0"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["adaptflow.processes"] == "2"
    assert "val_accuracy" in run.data.metrics
    assert {"candidate.json", "model.safetensors"} <= {p.name for p in two_process_run.iterdir()}
    # the checkpoint was removed once the candidate was saved, and no rank left a partial write
    leftovers = (
        list((two_process_run.parent / "checkpoint").glob("*"))
        if (two_process_run.parent / "checkpoint").exists()
        else []
    )
    assert leftovers == []


def test_stopped_two_process_run_resumes_to_the_same_weights(
    ddp_case: DdpCase, two_process_run: Path
) -> None:
    from adaptflow.errors import Interrupted
    from adaptflow.training.distributed import launch_on_this_node

    out = ddp_case.work / "resumed" / "candidate"
    args = _worker_args(ddp_case, out)
    # rank 1 alone "gets SIGTERM" after STOP_AFTER_STEPS steps: every rank must stop with it
    with pytest.raises(Interrupted, match="rank"):
        launch_on_this_node(2, [__file__, "--stop-rank-1-after", str(STOP_AFTER_STEPS), *args])
    checkpoints = list((out.parent / "checkpoint").glob("finetune-*.pt"))
    assert len(checkpoints) == 1
    assert not [p for p in checkpoints[0].parent.iterdir() if p not in checkpoints], "rank 0 alone writes"
    state = torch.load(checkpoints[0], weights_only=True)
    assert state["epoch"] == 2 and 0 < state["step"] <= STOP_AFTER_STEPS
    assert len(state["ranks"]) == 2  # each rank's RNG streams
    assert not out.exists()
    launch_on_this_node(2, args)
    assert _max_difference(_weights(out), _weights(two_process_run)) < RESUME_ATOL
    assert not checkpoints[0].exists()


def _stopping_worker(argv: list[str]) -> int:
    """The worker with a stop request that rank 1 sets by itself after ``n`` steps (as SIGTERM would)."""
    from adaptflow.signals import StopRequest
    from adaptflow.training import finetune_worker

    n = int(argv[1])
    checks = {"n": 0}
    original = StopRequest.__bool__

    def stop_after(self: StopRequest) -> bool:
        checks["n"] += 1
        return original(self) or (os.environ.get("RANK") == "1" and checks["n"] > n)

    StopRequest.__bool__ = stop_after  # type: ignore[method-assign]
    return finetune_worker.main(argv[2:])


if __name__ == "__main__":
    sys.exit(_stopping_worker(sys.argv[1:]))


def test_pretrain_under_torchrun_writes_one_weights_file_and_prints_once(
    tiny_assets: Any, tmp_path: Path
) -> None:
    """``torchrun -m adaptflow.cli pretrain``: 2 gloo ranks; rank 0 alone writes the weights and reports."""
    import json
    import subprocess

    from adaptflow.storage import sha256_file

    out = tmp_path / "w.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "adaptflow.cli"]
    command += ["pretrain", "--data", str(tiny_assets.source), "--out", str(out), "--epochs", "1", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"weights"') == 1, done.stdout  # rank 1 prints nothing
    result = json.loads(done.stdout)
    assert result["sha256"] == sha256_file(out)
    assert json.loads(out.with_name(out.name + ".json").read_text())["sha256"] == result["sha256"]
