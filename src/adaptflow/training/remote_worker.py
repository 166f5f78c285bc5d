"""The finetune worker inside a Kubeflow job's pod: stage the inputs in, train, rank 0 stages the model out.

The job's pods share no disk with the pipeline's finetune pod, so everything passes through the artifact
store under the pipeline root (``s3://…`` or a path every pod mounts), laid out by :func:`staging_layout`::

    <staging>/inputs/snapshot/…   <staging>/inputs/baseline/…   <staging>/inputs/config.json
    <staging>/outputs/candidate/… <staging>/outputs/_SUCCESS    (written last, by rank 0)

Every pod runs ``stage-in`` once, then torchrun starts ``train`` once per process. Resuming is the
worker's own: its checkpoint is keyed by the data, config and strategy and mirrored under
``<pipeline_root>/checkpoints/``, so a job made again by a retried task continues where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from adaptflow.errors import StoreError
from adaptflow.storage import download_to, is_s3, iter_s3_objects, local_path, s3_client, split_s3

log = logging.getLogger(__name__)

SUCCESS_MARKER = "_SUCCESS"


@dataclass(frozen=True)
class StagingLayout:
    root: str

    def uri(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def snapshot(self) -> str:
        return self.uri("inputs", "snapshot")

    @property
    def baseline(self) -> str:
        return self.uri("inputs", "baseline")

    @property
    def config(self) -> str:
        return self.uri("inputs", "config.json")

    @property
    def candidate(self) -> str:
        return self.uri("outputs", "candidate")

    @property
    def success(self) -> str:
        return self.uri("outputs", SUCCESS_MARKER)


def staging_layout(root: str) -> StagingLayout:
    return StagingLayout(root)


# --------------------------------------------------------------------------- moving folders


def upload_file(path: Path, uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().upload_file(str(path), bucket, key)
        except Exception as error:  # botocore raises many types; all mean "the store refused"
            raise StoreError(
                f"cannot write {uri}: {error}", hint="check the bucket, the credentials and the endpoint"
            ) from error
        return
    dest = local_path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, dest)


def upload_tree(folder: Path, uri: str) -> int:
    """Copies every file under ``folder`` to ``uri`` (same relative paths). Returns the file count."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        upload_file(path, f"{uri.rstrip('/')}/{path.relative_to(folder).as_posix()}")
    return len(files)


def download_tree(uri: str, folder: Path) -> int:
    """Copies every object under the ``uri`` prefix into ``folder``. Returns the file count."""
    folder.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        prefix = uri.rstrip("/") + "/"
        count = 0
        for item in iter_s3_objects(uri):
            dest = folder / item.uri[len(prefix) :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            download_to(item.uri, dest)
            count += 1
        return count
    src = local_path(uri)
    if not src.is_dir():
        return 0
    shutil.copytree(src, folder, dirs_exist_ok=True)
    return sum(1 for p in folder.rglob("*") if p.is_file())


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
        except Exception:
            return False
        return True
    return local_path(uri).exists()


def write_text(uri: str, text: str, scratch: Path) -> None:
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / ".staging-text"
    tmp.write_text(text)
    try:
        upload_file(tmp, uri)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the two commands


def stage_in(staging: str, work_dir: Path) -> None:
    layout = staging_layout(staging)
    for name, uri in (("snapshot", layout.snapshot), ("baseline", layout.baseline)):
        count = download_tree(uri, work_dir / name)
        if count == 0:
            raise StoreError(f"no {name} files under {uri}", hint="the submitting task stages them first")
    download_to(layout.config, work_dir / "config.json")
    log.info("staged the inputs in from %s to %s", staging, work_dir)


def train(staging: str, work_dir: Path, parent_run_id: str, fingerprint: str) -> int:
    """One torchrun process: the finetune worker in-process, then (rank 0 only) the candidate out."""
    from adaptflow.training.finetune_worker import main as run_worker

    out_dir = work_dir / "candidate"
    argv = [
        "--snapshot-dir", str(work_dir / "snapshot"),
        "--baseline-dir", str(work_dir / "baseline"),
        "--config-json-file", str(work_dir / "config.json"),
        "--parent-run-id", parent_run_id,
        "--fingerprint", fingerprint,
        "--out-dir", str(out_dir),
    ]  # fmt: skip
    status = run_worker(argv)
    if status:
        return int(status)
    if int(os.environ.get("RANK", "0")) == 0:
        layout = staging_layout(staging)
        count = upload_tree(out_dir, layout.candidate)
        write_text(layout.success, f"{count}\n", work_dir)  # last: the submitter trusts only a whole output
        log.info("rank 0 staged %d candidate files out to %s", count, layout.candidate)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaptflow.training.remote_worker")
    parser.add_argument("command", choices=("stage-in", "train"))
    parser.add_argument("--staging", required=True, help="the job's folder in the artifact store")
    parser.add_argument("--work-dir", required=True, type=Path)
    parser.add_argument("--parent-run-id", default="")
    parser.add_argument("--fingerprint", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "stage-in":
        stage_in(args.staging, args.work_dir)
        return 0
    return train(args.staging, args.work_dir, args.parent_run_id, args.fingerprint)


if __name__ == "__main__":
    sys.exit(main())
