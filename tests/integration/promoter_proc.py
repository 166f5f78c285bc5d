"""One promoter process for the race tests: register a real ONNX version with a known score, then promote.

Every promoter reads and scores the champion first ("evaluation"), says it is ready, and waits at
a barrier until the test has seen every promoter ready: every read is stale by design. Then it
promotes through adaptflow's own protocol from its own workdir, as a pipeline pod would: the lease
comes from ``lease_for`` with ``registry.lease_uri``, and a moved champion is re-scored through
onnxruntime on the same test split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lookup_models import register_lookup_version, rescorer, stale_promotion
from mlflow.tracking import MlflowClient

from adaptflow.config import RegistryConfig
from adaptflow.contracts import Snapshot
from adaptflow.lease import lease_for
from adaptflow.promotion import promote_under_lease
from adaptflow.registry import get_champion


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"promoter: {path} did not appear within {timeout:.0f}s")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--score", type=float, required=True)
    parser.add_argument("--experiment-id", required=True)
    parser.add_argument("--artifact-location", default="")
    parser.add_argument("--lease-uri", required=True)
    parser.add_argument("--workdir", required=True, help="this promoter's own workdir, as a pod has")
    parser.add_argument("--snapshot", required=True, help="folder of the shared test split's snapshot.json")
    parser.add_argument("--barrier", required=True, help="folder: write ready-<score>, wait for go")
    args = parser.parse_args()

    client = MlflowClient(args.tracking_uri)
    snapshot = Snapshot.load(args.snapshot)
    version, run = register_lookup_version(client, args.model, args.experiment_id, args.score)
    rescore = rescorer(args.tracking_uri, snapshot)
    seen = get_champion(args.tracking_uri, args.model)  # the stale read
    seen_score = rescore(seen).score if seen is not None else None
    assert seen is None or seen_score is not None
    barrier = Path(args.barrier)
    (barrier / f"ready-{args.score}").touch()
    wait_for(barrier / "go", timeout=240)
    registry = RegistryConfig(lease_uri=args.lease_uri, lease_ttl_seconds=60, lease_wait_seconds=180)
    lease = lease_for(args.model, registry, args.workdir, args.tracking_uri, args.artifact_location or None)
    inputs = stale_promotion(
        args.tracking_uri, args.model, version, run, args.score, seen, seen_score, snapshot
    )
    decision, before, after = promote_under_lease(inputs, lease, rescore)
    client.set_terminated(run)
    print(
        json.dumps(
            {
                "version": version,
                "score": args.score,
                "promoted": decision.promote,
                "seen": seen.version if seen else None,
                "before": before,
                "after": after,
                "holder": lease.holder,
                "lease": lease.uri,
                "reasons": list(decision.reasons),
                "seen_accuracy": seen_score.accuracy if seen_score else None,
            }
        )
    )


if __name__ == "__main__":
    main()
