"""Race-safe promotion: a bare alias move loses the stale-read race; adaptflow's lease + re-read does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from promoter_proc import EXPORT, SCORE_TAG, rescore_from_tag

from adaptflow.config import GateConfig
from adaptflow.contracts import Evaluation
from adaptflow.lease import FileLease
from adaptflow.registry import CHAMPION, PromotionInputs, get_champion, promote_under_lease
from adaptflow.tracking import embedded_tracking_uri, ensure_experiment
from factories import model_score

pytestmark = pytest.mark.integration

PROMOTER = Path(__file__).with_name("promoter_proc.py")


def _setup(uri: str, workdir: Path, model: str, champion_score: float) -> tuple[MlflowClient, str, str]:
    client = MlflowClient(uri)
    experiment = ensure_experiment(uri, "race", workdir)
    client.create_registered_model(model)
    run = client.create_run(experiment)
    v0 = str(
        client.create_model_version(
            model, f"runs:/{run.info.run_id}/model", run.info.run_id, tags={SCORE_TAG: str(champion_score)}
        ).version
    )
    client.set_registered_model_alias(model, CHAMPION, v0)
    return client, experiment, v0


def _new_version(client: MlflowClient, model: str, experiment: str, score: float) -> tuple[str, str]:
    run = client.create_run(experiment).info.run_id
    return str(
        client.create_model_version(model, f"runs:/{run}/model", run, tags={SCORE_TAG: str(score)}).version
    ), run


def test_forced_interleaving_bare_alias_loses_adaptflow_does_not(tmp_path: Path) -> None:
    """A (0.95) and B (0.90) both read champion v0 (0.85); A moves first, then B."""
    uri = embedded_tracking_uri(tmp_path)

    # 1. The bare protocol: read, compare, set_registered_model_alias. B overwrites the better A.
    client, experiment, _ = _setup(uri, tmp_path, "bare", 0.85)
    a, _ = _new_version(client, "bare", experiment, 0.95)
    b, _ = _new_version(client, "bare", experiment, 0.90)
    seen_by_a = seen_by_b = get_champion(uri, "bare")
    assert seen_by_a is not None and seen_by_b is not None
    for version, score in ((a, 0.95), (b, 0.90)):  # both compared against the stale v0 score
        if score > 0.85:
            client.set_registered_model_alias("bare", CHAMPION, version)
    assert get_champion(uri, "bare").version == b  # type: ignore[union-attr]  # the race is lost

    # 2. adaptflow: same stale reads, same order, but the move happens under a lease with a re-read.
    client, experiment, _ = _setup(uri, tmp_path, "safe", 0.85)
    stale = get_champion(uri, "safe")
    lease_path = tmp_path / "locks" / "safe.lock"
    a_done = threading.Event()
    results: dict[str, bool] = {}

    def promote(score: float, first: bool) -> None:
        version, run = _new_version(client, "safe", experiment, score)
        evaluation = Evaluation(
            scores=(model_score("candidate", score), rescore_from_tag(client, "safe")(stale)),
            winner="candidate",
            winner_reason="r",
            champion=stale,
            test_size=1000,
            fingerprint="f" * 64,
        )
        inputs = PromotionInputs(
            uri,
            "safe",
            version,
            model_score("candidate", score),
            evaluation,
            EXPORT,
            GateConfig(min_accuracy=0.0, min_delta=0.001),
            {"pipeline": run, "register": run},
        )
        if not first:
            a_done.wait(30)  # force the interleaving: B moves after A, with its stale evaluation
        decision, _, _ = promote_under_lease(inputs, FileLease(lease_path), rescore_from_tag(client, "safe"))
        results[version] = decision.promote
        if first:
            a_done.set()

    threads = [
        threading.Thread(target=promote, args=(0.95, True)),
        threading.Thread(target=promote, args=(0.90, False)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    champion = get_champion(uri, "safe")
    assert champion is not None
    assert client.get_model_version("safe", champion.version).tags[SCORE_TAG] == "0.95"
    worse = next(v for v, promoted in results.items() if not promoted)
    tags = client.get_model_version("safe", worse).tags
    assert tags["adaptflow.gate.decision"] == "rejected"
    assert "champion changed during this run" in tags["adaptflow.gate.reasons"]


def run_promoters(
    uri: str, workdir: Path, artifact_location: str, env: dict[str, str], scores: list[float]
) -> list[dict]:
    model = "race-model"
    client, experiment, _ = _setup(uri, workdir, model, 0.5)
    start_at = time.time() + 12.0  # every process has read the champion by then (stale reads)
    here = Path(__file__).parent  # promoter_proc.py and tests/factories.py
    env = {**env, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), env.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(PROMOTER),
                "--tracking-uri",
                uri,
                "--model",
                model,
                "--score",
                str(score),
                "--experiment-id",
                experiment,
                "--artifact-location",
                artifact_location,
                "--workdir",
                str(workdir),
                "--start-at",
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for score in scores
    ]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    champion = get_champion(uri, model)
    assert champion is not None
    versions = client.search_model_versions(f"name='{model}'")
    assert len(versions) == len(scores) + 1  # nothing lost: every candidate is registered
    by_version = {str(v.version): v for v in versions}
    best = max(outputs, key=lambda o: o["score"])
    assert champion.version == best["version"]
    for o in outputs:
        tags = by_version[o["version"]].tags
        assert tags["adaptflow.gate.decision"] == ("promoted" if o["promoted"] else "rejected")
        if not o["promoted"]:
            assert tags["adaptflow.gate.reasons"]  # every loser says why
    return outputs


def test_eight_concurrent_promoters_embedded(tmp_path: Path) -> None:
    scores = [0.61, 0.93, 0.72, 0.88, 0.97, 0.65, 0.91, 0.79]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    run_promoters(embedded_tracking_uri(tmp_path), tmp_path, "", env, scores)
