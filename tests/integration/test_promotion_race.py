"""Race-safe promotion: a bare alias move loses the stale-read race; adaptflow's lease + re-read does not.

The versions are real ONNX models (tests/integration/lookup_models.py) and a moved champion is
re-scored through adaptflow's own champion scoring on the same test split, as the register stage does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from lookup_models import register_lookup_version, rescorer, stale_promotion, write_test_split
from mlflow.tracking import MlflowClient

from adaptflow.lease import LEASE_TAG, FileLease
from adaptflow.promotion import promote_under_lease, read_audit
from adaptflow.registry import CHAMPION, get_champion
from adaptflow.tracking import embedded_tracking_uri, ensure_experiment

pytestmark = pytest.mark.integration

PROMOTER = Path(__file__).with_name("promoter_proc.py")


def _setup(uri: str, workdir: Path, model: str, champion_score: float) -> tuple[MlflowClient, str, str]:
    client = MlflowClient(uri)
    experiment = ensure_experiment(uri, "race", workdir)
    client.create_registered_model(model)
    v0, _ = register_lookup_version(client, model, experiment, champion_score)
    client.set_registered_model_alias(model, CHAMPION, v0)
    return client, experiment, v0


def test_forced_interleaving_bare_alias_loses_adaptflow_does_not(tmp_path: Path) -> None:
    """A (0.95) and B (0.90) both read champion v0 (0.85); A moves first, then B."""
    uri = embedded_tracking_uri(tmp_path)
    snapshot = write_test_split(tmp_path / "test-split")
    rescore = rescorer(uri, snapshot)

    # 1. The bare protocol: read, compare, set_registered_model_alias. B overwrites the better A.
    client, experiment, _ = _setup(uri, tmp_path, "bare", 0.85)
    a, _ = register_lookup_version(client, "bare", experiment, 0.95)
    b, _ = register_lookup_version(client, "bare", experiment, 0.90)
    seen_by_a = seen_by_b = get_champion(uri, "bare")
    assert seen_by_a is not None and seen_by_b is not None
    for version, score in ((a, 0.95), (b, 0.90)):  # both compared against the stale v0 score
        if score > 0.85:
            client.set_registered_model_alias("bare", CHAMPION, version)
    assert get_champion(uri, "bare").version == b  # type: ignore[union-attr]  # the race is lost

    # 2. adaptflow: same stale reads, same order, but the move happens under a lease with a re-read.
    client, experiment, v0 = _setup(uri, tmp_path, "safe", 0.85)
    stale = get_champion(uri, "safe")
    assert stale is not None
    stale_score = rescore(stale).score
    assert stale_score is not None and stale_score.accuracy == 0.85  # re-scored through onnxruntime
    lease_path = tmp_path / "locks" / "safe.lock"
    a_done = threading.Event()
    results: dict[float, tuple[str, bool, list[str]]] = {}
    errors: list[BaseException] = []

    def promote(score: float, first: bool) -> None:
        try:
            version, run = register_lookup_version(client, "safe", experiment, score)
            inputs = stale_promotion(uri, "safe", version, run, score, stale, stale_score, snapshot)
            if not first:
                assert a_done.wait(60)  # force the interleaving: B moves after A, with its stale evaluation
            decision, _, _ = promote_under_lease(inputs, FileLease(lease_path), rescore)
            results[score] = (version, decision.promote, list(decision.reasons))
        except BaseException as error:  # a worker's failure fails the test, not just a warning
            errors.append(error)
        finally:
            if first:
                a_done.set()

    threads = [
        threading.Thread(target=promote, args=(0.95, True)),
        threading.Thread(target=promote, args=(0.90, False)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert set(results) == {0.95, 0.90}
    champion = get_champion(uri, "safe")
    assert champion is not None and champion.version == results[0.95][0]
    version_b, promoted_b, reasons_b = results[0.90]
    assert promoted_b is False
    # B saw the champion move under the lease and re-scored A's real model: 0.90 vs 0.95
    assert reasons_b[0] == f"champion changed during this run (v{v0} -> v{results[0.95][0]}); compared again"
    assert any("0.9000 vs 0.9500 on the same 100 test images" in r for r in reasons_b), reasons_b
    tags = client.get_model_version("safe", version_b).tags
    assert tags["adaptflow.gate.decision"] == "rejected"
    assert tags[LEASE_TAG] == lease_path.resolve().as_uri()


def run_promoters(
    uri: str,
    workdir: Path,
    lease_uri: str,
    env: dict[str, str],
    scores: list[float],
    artifact_location: str = "",
) -> list[dict]:
    """One process per score, each from its own workdir; returns their outputs after checking the race."""
    model = "race-model"
    client, experiment, v0 = _setup(uri, workdir, model, 0.5)
    snapshot_dir = workdir / "snapshot"
    write_test_split(workdir / "test-split").save(snapshot_dir)
    barrier = workdir / "barrier"
    barrier.mkdir()
    here = Path(__file__).parent  # promoter_proc.py, lookup_models.py and tests/factories.py
    env = {**env, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), env.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(PROMOTER),
                *("--tracking-uri", uri, "--model", model, "--score", str(score)),
                *("--experiment-id", experiment, "--artifact-location", artifact_location),
                *("--lease-uri", lease_uri, "--workdir", str(workdir / f"pod-{i}")),
                *("--snapshot", str(snapshot_dir), "--barrier", str(barrier)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i, score in enumerate(scores)
    ]
    # The barrier: every promoter has read (and scored) the stale champion before any may promote.
    deadline = time.monotonic() + 240
    while len(list(barrier.glob("ready-*"))) < len(scores):
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, dead[0].communicate()[1][-3000:]
        assert time.monotonic() < deadline, "promoters did not all read the champion in time"
        time.sleep(0.1)
    (barrier / "go").touch()
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))

    assert all(o["seen"] == v0 for o in outputs)  # every read was stale
    # The first holder promotes over v0 (every score beats 0.5); every later one saw the champion move.
    moved = [o for o in outputs if o["before"] != o["seen"]]
    assert len(moved) == len(scores) - 1
    assert all(o["reasons"][0].startswith("champion changed during this run") for o in moved)
    champion = get_champion(uri, model)
    assert champion is not None
    versions = client.search_model_versions(f"name='{model}'")
    assert len(versions) == len(scores) + 1  # nothing lost: every candidate is registered
    by_version = {str(v.version): v for v in versions}
    best = max(outputs, key=lambda o: o["score"])
    assert champion.version == best["version"]
    leases = {o["lease"] for o in outputs}
    assert len(leases) == 1, f"promoters in different workdirs took different leases: {leases}"
    for o in outputs:
        tags = by_version[o["version"]].tags
        assert tags["adaptflow.gate.decision"] == ("promoted" if o["promoted"] else "rejected")
        assert tags[LEASE_TAG] == o["lease"]
        if not o["promoted"]:
            assert "not better than champion" in tags["adaptflow.gate.reasons"]  # every loser says why
    # The audit trail is one chain in lease order, each promotion over the one before, rising in score.
    trail = read_audit(uri, model)
    score_of = {o["version"]: o["score"] for o in outputs}
    assert sorted(r["new_champion"] for r in trail) == sorted(o["version"] for o in outputs if o["promoted"])
    assert [r["previous_champion"] for r in trail] == [v0] + [r["new_champion"] for r in trail[:-1]]
    chain = [score_of[r["new_champion"]] for r in trail]
    assert chain == sorted(chain) and chain[-1] == best["score"]
    assert {r["lease"] for r in trail} == leases
    return outputs


# slow (make test-all): the same race runs in CI against the mlflow server (test_stack.py)
@pytest.mark.slow
def test_eight_concurrent_promoters_embedded(tmp_path: Path) -> None:
    """Eight pods' worth of workdirs share one lease folder (registry.lease_uri) and the embedded store."""
    scores = [0.61, 0.93, 0.72, 0.88, 0.97, 0.65, 0.91, 0.79]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    shared = tmp_path / "shared-locks"
    outputs = run_promoters(embedded_tracking_uri(tmp_path), tmp_path, str(shared), env, scores)
    assert {o["lease"] for o in outputs} == {(shared / "race-model.lock").resolve().as_uri()}
