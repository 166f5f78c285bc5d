"""A registered model version's description: a short model card in Markdown, as MLflow's model
version page shows it (data, strategy, metrics with intervals, the gate's decision, export parity,
lineage). The full audit record is an artifact the card links to, not a tag."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adaptflow.contracts import Candidate, Evaluation, ExportResult, GateDecision, Snapshot


def _score_row(evaluation: Evaluation, name: str) -> str:
    s = evaluation.score(name)
    low, high = s.accuracy_ci95
    return f"| {name} ({s.kind}) | {s.accuracy:.4f} | {low:.3f}–{high:.3f} | {s.macro_f1:.4f} |"


def model_card(
    *,
    version: str,
    winner: Candidate,
    snapshot: Snapshot,
    evaluation: Evaluation,
    export: ExportResult,
    decision: GateDecision,
    lineage: dict[str, str],
    audit_uri: str | None,
) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in snapshot.counts.items())
    verdict = "**promoted to champion**" if decision.promote else "**not promoted**"
    rows = [_score_row(evaluation, s.name) for s in evaluation.scores]
    lines = [
        f"## v{version}: {winner.name}",
        "",
        f"- **Data**: `{snapshot.source_uri}`, fingerprint `{snapshot.fingerprint[:16]}`; {counts}; "
        f"{len(snapshot.class_names)} classes; {len(snapshot.quarantined)} files quarantined",
        f"- **Model**: {winner.backbone.name}, strategy {winner.strategy}; input {winner.preprocessing.input_size} px",
        f"- **Winner**: {evaluation.winner_reason}",
        "",
        f"Test split: {evaluation.test_size} images (95% intervals: bootstrap over the test images).",
        "",
        "| model | test accuracy | 95% CI | macro-F1 |",
        "|---|---|---|---|",
        *rows,
        "",
        f"### Gate: {verdict}",
        "",
        *[f"- {reason}" for reason in decision.reasons],
        "",
        f"### Export: ONNX opset {export.opset}, max |onnxruntime − PyTorch| {export.max_abs_diff:.2e} "
        f"(tolerance {export.tolerance:.0e}), p50 latency {export.latency_ms_p50:.2f} ms",
        "",
        "### Lineage",
        "",
        *[f"- {key}: `{value}`" for key, value in lineage.items()],
    ]
    if audit_uri:
        lines.append(f"- audit trail (every champion move): `{audit_uri}`")
    return "\n".join(lines) + "\n"
