"""The promotion protocol (DESIGN.md, "Promotion protocol").

1. The winner is registered by :mod:`adaptflow.publish`; the ``challenger`` alias always moves.
2. The gate (:func:`decide_gate`): absolute thresholds, ONNX parity and latency, ``min_delta`` over
   the champion's fresh score on this run's test split, and optionally McNemar significance.
3. ``champion`` moves only under a lease; inside it the champion is re-read and, if it changed
   since evaluation, the new champion is re-scored on the same test split and the gate re-run.
4. Every alias move appends an audit record to a cumulative JSONL artifact (the model version's
   description links to it; its ``adaptflow.audit.last`` tag says promote or rollback).
   A rejected version stays registered, tagged with why. ``rollback`` walks the trail back.
"""

from __future__ import annotations

import getpass
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptflow.config import GateConfig, RegistryConfig
from adaptflow.contracts import ChampionRef, Evaluation, ExportResult, GateDecision, ModelScore
from adaptflow.errors import ConfigError, StoreError
from adaptflow.lease import LEASE_TAG, Lease, lease_for
from adaptflow.registry import CHAMPION, GATE_DECISION_TAG, GATE_REASONS_TAG, _client, get_champion

log = logging.getLogger(__name__)

AUDIT_FILE = "audit/champion_audit.jsonl"
AUDIT_POINTER_TAG = "adaptflow.audit_log_run_id"


def decide_gate(
    winner: ModelScore,
    champion: ModelScore | None,
    export: ExportResult,
    p_value: float | None,
    cfg: GateConfig,
    champion_note: str | None = None,
    reference: ModelScore | None = None,
) -> GateDecision:
    """Promote or not, with a reason per check. ``reference`` is the better pixel reference
    (:mod:`adaptflow.references`): a winner must beat it, by ``gate.reference_margin``."""
    ok = True
    reasons: list[str] = []

    def check(passed: bool, good: str, bad: str) -> None:
        nonlocal ok
        ok &= passed
        reasons.append(good if passed else bad)

    a = winner.accuracy
    check(
        a >= cfg.min_accuracy,
        f"accuracy {a:.4f} >= min_accuracy {cfg.min_accuracy:.4f}",
        f"accuracy {a:.4f} is below min_accuracy {cfg.min_accuracy:.4f}",
    )
    check(
        export.passed,
        f"ONNX parity {export.max_abs_diff:.1e} within tolerance {export.tolerance:.0e}",
        f"ONNX parity {export.max_abs_diff:.1e} exceeds tolerance {export.tolerance:.0e}",
    )
    check(
        export.latency_ms_p50 <= cfg.max_latency_ms,
        f"ONNX p50 latency {export.latency_ms_p50:.2f} ms within {cfg.max_latency_ms:.0f} ms",
        f"ONNX p50 latency {export.latency_ms_p50:.2f} ms exceeds {cfg.max_latency_ms:.0f} ms",
    )
    margin = cfg.reference_margin
    if reference is not None and margin is None:
        reasons.append(
            f"reference {reference.name} {reference.accuracy:.4f} (gate.reference_margin=null: not checked)"
        )
    elif reference is not None and margin is not None:
        gain = a - reference.accuracy
        check(
            gain > 0 and gain >= margin,
            f"beats the reference {reference.name} by {gain:+.4f} ({a:.4f} vs {reference.accuracy:.4f}; "
            f"reference_margin {margin:.4f})",
            f"does not beat the reference {reference.name}: {a:.4f} vs {reference.accuracy:.4f} on the same "
            f"{reference.n} test images, {gain:+.4f} (reference_margin {margin:.4f})",
        )
    if champion is None:
        reasons.append(champion_note or "no champion yet: the absolute thresholds alone decide")
    else:
        delta = a - champion.accuracy
        check(
            delta >= cfg.min_delta,
            f"beats champion v{champion.version} by {delta:+.4f} ({a:.4f} vs {champion.accuracy:.4f} on the "
            f"same {champion.n} test images; min_delta {cfg.min_delta:.4f})",
            f"not better than champion v{champion.version}: {a:.4f} vs {champion.accuracy:.4f} on the same "
            f"{champion.n} test images, delta {delta:+.4f} < min_delta {cfg.min_delta:.4f}",
        )
        if cfg.require_significance:
            p = 1.0 if p_value is None else p_value
            check(
                p < cfg.alpha,
                f"McNemar p={p:.4f} < alpha {cfg.alpha}",
                f"difference from the champion is not significant: McNemar p={p:.4f} >= alpha {cfg.alpha}",
            )
        elif p_value is not None:
            reasons.append(
                f"McNemar p={p_value:.4f} vs champion (informational; gate.require_significance=false)"
            )
    return GateDecision(promote=ok, reasons=tuple(reasons))


@dataclass(frozen=True)
class AuditRecord:
    action: str  # promote | rollback
    model_name: str
    new_champion: str
    previous_champion: str | None
    reason: str
    metrics: dict[str, float]
    run_ids: dict[str, str]
    holder: str
    lease: str
    user: str
    time: float

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


def read_audit(tracking_uri: str, model_name: str) -> list[dict[str, Any]]:
    """The cumulative audit trail (oldest first)."""
    import mlflow

    client = _client(tracking_uri)
    try:
        model = client.get_registered_model(model_name)
    except Exception as error:
        raise StoreError(f"registered model {model_name!r} not found at {tracking_uri}") from error
    run_id = model.tags.get(AUDIT_POINTER_TAG)
    if not run_id:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=AUDIT_FILE, dst_path=tmp, tracking_uri=tracking_uri
        )
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def append_audit(tracking_uri: str, record: AuditRecord, run_id: str) -> None:
    """Must be called under the lease: read trail, append, write it to ``run_id``, move the pointer."""
    client = _client(tracking_uri)
    trail = read_audit(tracking_uri, record.model_name)
    lines = [json.dumps(r, sort_keys=True) for r in trail] + [record.to_json()]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(AUDIT_FILE).name
        path.write_text("\n".join(lines) + "\n")
        client.log_artifact(run_id, str(path), artifact_path=str(Path(AUDIT_FILE).parent))
    # the record itself is the artifact above (the version's description links to it), not a JSON tag
    client.set_model_version_tag(
        record.model_name, record.new_champion, "adaptflow.audit.last", record.action
    )
    client.set_registered_model_tag(record.model_name, AUDIT_POINTER_TAG, run_id)


@dataclass(frozen=True)
class ChampionRescore:
    """The champion scored on this run's test split; ``score`` is None when it is not comparable."""

    score: ModelScore | None
    note: str | None = None


RescoreChampion = Callable[[ChampionRef], ChampionRescore]


@dataclass(frozen=True)
class PromotionInputs:
    tracking_uri: str
    model_name: str
    version: str
    winner_score: ModelScore
    evaluation: Evaluation
    export: ExportResult
    gate: GateConfig
    run_ids: dict[str, str]


def promote_under_lease(
    inputs: PromotionInputs, lease: Lease, rescore: RescoreChampion
) -> tuple[GateDecision, str | None, str | None]:
    """Runs the gate and moves ``champion`` if it passes. Returns (decision, before, after)."""
    client = _client(inputs.tracking_uri)
    evaluation = inputs.evaluation
    seen = evaluation.champion.version if evaluation.champion else None
    champion_score = evaluation.champion_score()
    with lease:
        current = get_champion(inputs.tracking_uri, inputs.model_name)
        now = current.version if current else None
        p_value = evaluation.mcnemar_p_value
        note = evaluation.champion_note
        if now != seen:
            log.warning(
                "champion moved from v%s to v%s since evaluation; re-scoring on the same test split",
                seen,
                now,
            )
            rescored = rescore(current) if current else ChampionRescore(None)
            champion_score = rescored.score
            p_value = None
            note = f"champion changed during this run (v{seen} -> v{now}); compared again"
            if rescored.note:
                note = f"{note}: {rescored.note}"
        reference = evaluation.reference_score()
        decision = decide_gate(
            inputs.winner_score, champion_score, inputs.export, p_value, inputs.gate, note, reference
        )
        if now != seen and champion_score is not None:  # otherwise decide_gate already said the note
            decision = GateDecision(promote=decision.promote, reasons=(note or "", *decision.reasons))
        # Nothing is lost: every version stays registered and says why it was, or was not, promoted.
        verdict = "promoted" if decision.promote else "rejected"
        client.set_model_version_tag(inputs.model_name, inputs.version, LEASE_TAG, lease.uri)
        client.set_model_version_tag(inputs.model_name, inputs.version, GATE_DECISION_TAG, verdict)
        client.set_model_version_tag(
            inputs.model_name, inputs.version, GATE_REASONS_TAG, "; ".join(decision.reasons)[:4900]
        )
        if decision.promote:
            client.set_registered_model_alias(inputs.model_name, CHAMPION, inputs.version)
            record = AuditRecord(
                action="promote",
                model_name=inputs.model_name,
                new_champion=inputs.version,
                previous_champion=now,
                reason="; ".join(decision.reasons),
                metrics={"accuracy": inputs.winner_score.accuracy, "macro_f1": inputs.winner_score.macro_f1},
                run_ids=inputs.run_ids,
                holder=lease.holder,
                lease=lease.uri,
                user=getpass.getuser(),
                time=time.time(),
            )
            append_audit(inputs.tracking_uri, record, inputs.run_ids["register"])
            return decision, now, inputs.version
        return decision, now, now


def rollback_differences(client: Any, model_name: str, current: str, target: str) -> list[str]:
    """Why moving ``champion`` from ``current`` to ``target`` needs ``--force``: the gate rejected the
    target, or it has another backbone or other classes than the current champion."""
    now = client.get_model_version(model_name, current).tags or {}
    then = client.get_model_version(model_name, target).tags or {}
    found = []
    decision = then.get(GATE_DECISION_TAG)
    if decision is not None and decision != "promoted":  # a version registered outside adaptflow has none
        reasons = then.get(GATE_REASONS_TAG) or "no reasons recorded"
        found.append(f"the gate did not promote v{target} ({decision}: {reasons})")
    for tag, what in (("adaptflow.backbone", "backbone"), ("adaptflow.backbone_sha256", "backbone weights")):
        if now.get(tag) != then.get(tag):
            found.append(f"{what}: v{target} has {then.get(tag)}, v{current} has {now.get(tag)}")
    if now.get("adaptflow.class_names") != then.get("adaptflow.class_names"):
        found.append(
            f"classes: v{target} has {then.get('adaptflow.class_names')}, "
            f"v{current} has {now.get('adaptflow.class_names')}"
        )
    return found


def rollback(
    tracking_uri: str,
    model_name: str,
    lease: Lease,
    to_version: str | None,
    run_id: str,
    reason: str = "",
    force: bool = False,
) -> AuditRecord:
    """Moves ``champion`` back one step along the audit trail (or to ``to_version``), under the lease.
    A target the gate rejected, or with another backbone or classes, needs ``force``; the
    differences then go into the audit record's reason."""
    client = _client(tracking_uri)
    with lease:
        current = get_champion(tracking_uri, model_name)
        if current is None:
            raise StoreError(f"{model_name} has no champion to roll back", hint="nothing was ever promoted")
        if to_version is None:
            trail = read_audit(tracking_uri, model_name)
            previous = next(
                (
                    r["previous_champion"]
                    for r in reversed(trail)
                    if r["new_champion"] == current.version and r.get("previous_champion")
                ),
                None,
            )
            if previous is None:
                raise StoreError(
                    f"the audit trail of {model_name} has no champion before v{current.version}",
                    hint="pass --to VERSION to choose one explicitly",
                )
            to_version = str(previous)
        try:
            client.get_model_version(model_name, to_version)
        except Exception:
            known = sorted(int(v.version) for v in client.search_model_versions(f"name='{model_name}'"))
            raise StoreError(
                f"{model_name} has no version {to_version}",
                hint=f"its versions are {', '.join(map(str, known))}; `adaptflow history` lists its champions",
            ) from None
        differences = rollback_differences(client, model_name, current.version, to_version)
        if differences and not force:
            raise ConfigError(
                f"rolling {model_name} back to v{to_version} needs --force: " + "; ".join(differences),
                hint="check that serving can take that model, then run the same command with --force",
            )
        for difference in differences:
            log.warning("rollback to v%s: %s", to_version, difference)
        client.set_registered_model_alias(model_name, CHAMPION, to_version)
        said = reason or f"rollback from v{current.version}"
        record = AuditRecord(
            action="rollback",
            model_name=model_name,
            new_champion=to_version,
            previous_champion=current.version,
            reason=said + (f" (forced: {'; '.join(differences)})" if differences else ""),
            metrics={},
            run_ids={"rollback": run_id},
            holder=lease.holder,
            lease=lease.uri,
            user=getpass.getuser(),
            time=time.time(),
        )
        append_audit(tracking_uri, record, run_id)
        return record


def rollback_champion(
    tracking_uri: str,
    experiment_name: str,
    workdir: str | Path,
    registry_cfg: RegistryConfig,
    model_name: str,
    to_version: str | None = None,
    reason: str = "",
    force: bool = False,
) -> AuditRecord:
    """``adaptflow rollback``: :func:`rollback` under the model's lease, recorded as its own MLflow run.

    The run (tagged ``adaptflow.stage=rollback``) holds the audit trail it appends to; it ends
    FINISHED, FAILED when the rollback is refused or fails, KILLED when interrupted.
    """
    from adaptflow.tracking import ensure_experiment, run_lifecycle

    client = _client(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, experiment_name, workdir)
    run_id = client.create_run(
        experiment_id, run_name=f"rollback {model_name}", tags={"adaptflow.stage": "rollback"}
    ).info.run_id
    with run_lifecycle(tracking_uri, run_id):
        artifacts = client.get_experiment(experiment_id).artifact_location
        lease = lease_for(model_name, registry_cfg, workdir, tracking_uri, artifacts)
        return rollback(tracking_uri, model_name, lease, to_version, run_id, reason, force)
