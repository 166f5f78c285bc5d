"""One promoter process for the race tests: register a version with a given score, then promote.

Every promoter reads the champion first ("evaluation"), waits until all have done so (a start
barrier in time), then promotes through adaptflow's protocol: the reads are stale by design.
"""

from __future__ import annotations

import argparse
import json
import time

from mlflow.tracking import MlflowClient

from adaptflow.config import GateConfig, RegistryConfig
from adaptflow.contracts import ChampionRef, Evaluation, ModelScore
from adaptflow.registry import PromotionInputs, get_champion, lease_for, promote_under_lease
from factories import export_result, model_score

SCORE_TAG = "race.score"
EXPORT = export_result(latency_ms=1.0)


def rescore_from_tag(client: MlflowClient, model: str):  # type: ignore[no-untyped-def]
    """Stands in for re-scoring a champion on the test split: these versions carry their score."""

    def rescore(ref: ChampionRef) -> ModelScore:
        tags = client.get_model_version(model, ref.version).tags
        return model_score("champion", float(tags[SCORE_TAG]), version=ref.version, n=1000)

    return rescore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--score", type=float, required=True)
    parser.add_argument("--experiment-id", required=True)
    parser.add_argument("--artifact-location", default="")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--start-at", type=float, required=True)
    args = parser.parse_args()

    client = MlflowClient(args.tracking_uri)
    run = client.create_run(args.experiment_id, run_name=f"promoter {args.score}")
    version = str(
        client.create_model_version(
            args.model, f"runs:/{run.info.run_id}/model", run.info.run_id, tags={SCORE_TAG: str(args.score)}
        ).version
    )
    seen = get_champion(args.tracking_uri, args.model)  # the stale read
    scores = [model_score("candidate", args.score, version=None, n=1000)]
    if seen is not None:
        scores.append(rescore_from_tag(client, args.model)(seen))
    evaluation = Evaluation(
        scores=tuple(scores),
        winner="candidate",
        winner_reason="race",
        champion=seen,
        test_size=1000,
        fingerprint="f" * 64,
    )
    time.sleep(max(0.0, args.start_at - time.time()))
    lease = lease_for(
        args.model,
        args.artifact_location or None,
        args.workdir,
        RegistryConfig(lease_ttl_seconds=60, lease_wait_seconds=120),
    )
    decision, before, after = promote_under_lease(
        PromotionInputs(
            args.tracking_uri,
            args.model,
            version,
            scores[0],
            evaluation,
            EXPORT,
            GateConfig(min_accuracy=0.0, min_delta=0.001),
            {"pipeline": run.info.run_id, "register": run.info.run_id},
        ),
        lease,
        rescore_from_tag(client, args.model),
    )
    client.set_terminated(run.info.run_id)
    print(
        json.dumps(
            {
                "version": version,
                "score": args.score,
                "promoted": decision.promote,
                "before": before,
                "after": after,
            }
        )
    )


if __name__ == "__main__":
    main()
