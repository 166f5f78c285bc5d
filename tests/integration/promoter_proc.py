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

from lookup_models import register_lookup_version, rescorer
from mlflow.tracking import MlflowClient

from adaptflow.config import GateConfig, RegistryConfig
from adaptflow.contracts import Evaluation, Snapshot
from adaptflow.registry import PromotionInputs, get_champion, lease_for, promote_under_lease
from factories import export_result, model_score

EXPORT = export_result(latency_ms=1.0)
GATE = GateConfig(min_accuracy=0.0, min_delta=0.001)


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
    scores = [model_score("candidate", args.score, version=None, n=len(snapshot.entries))]
    if seen is not None:
        champion_score = rescore(seen).score
        assert champion_score is not None
        scores.append(champion_score)
    evaluation = Evaluation(
        scores=tuple(scores),
        winner="candidate",
        winner_reason="race",
        champion=seen,
        test_size=len(snapshot.entries),
        fingerprint=snapshot.fingerprint,
    )
    barrier = Path(args.barrier)
    (barrier / f"ready-{args.score}").touch()
    wait_for(barrier / "go", timeout=240)
    registry = RegistryConfig(lease_uri=args.lease_uri, lease_ttl_seconds=60, lease_wait_seconds=180)
    lease = lease_for(args.model, registry, args.workdir, args.tracking_uri, args.artifact_location or None)
    decision, before, after = promote_under_lease(
        PromotionInputs(
            args.tracking_uri,
            args.model,
            version,
            scores[0],
            evaluation,
            EXPORT,
            GATE,
            {"pipeline": run, "register": run},
        ),
        lease,
        rescore,
    )
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
                "seen_accuracy": scores[1].accuracy if seen else None,
            }
        )
    )


if __name__ == "__main__":
    main()
