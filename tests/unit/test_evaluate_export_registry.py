from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adaptflow.config import EvaluateConfig, ExportConfig, GateConfig, RegistryConfig
from adaptflow.contracts import ChampionRef, ExportResult, ModelScore
from adaptflow.errors import ExportError, LeaseError
from adaptflow.evaluation import ChampionModel, HeldOut, choose_winner, evaluate, mcnemar_exact
from adaptflow.export import export_onnx
from adaptflow.lease import FileLease
from adaptflow.onnx_model import load_onnx_classifier
from adaptflow.promotion import GateDecision, decide_gate
from concurrency import peak_concurrency
from factories import export_result, model_score


@pytest.fixture(scope="module")
def exported(tiny_baseline):  # type: ignore[no-untyped-def]
    b = tiny_baseline
    result = export_onnx(b.candidate_dir, ExportConfig(latency_runs=3), b.work / "onnx")
    settings, snapshot, work = b.settings, b.snapshot, b.work
    return settings, snapshot, work, result


def test_onnx_export_checks_parity_and_carries_preprocessing(exported) -> None:  # type: ignore[no-untyped-def]
    _settings, snapshot, work, result = exported
    assert set(result.parity) == {"1", "3", "7"}
    assert result.passed and result.max_abs_diff <= result.tolerance
    model = load_onnx_classifier(work / "onnx" / ExportResult.ONNX)
    assert model.class_names == snapshot.class_names
    assert model.preprocessing.input_size == 32
    # dynamic batch axis: any batch size runs
    assert model.logits(np.zeros((5, 3, 32, 32), np.float32)).shape == (5, 5)


def test_export_fails_above_tolerance(exported, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _settings, _snapshot, work, _result = exported
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(work / "baseline" / "candidate", ExportConfig(tolerance=1e-12, latency_runs=1), tmp_path)
    assert ExportResult.load(tmp_path).passed is False  # the figures are kept for the record


def test_evaluate_scores_candidates_and_champion_on_the_same_split(exported) -> None:  # type: ignore[no-untyped-def]
    _settings, snapshot, work, _result = exported
    champion = ChampionModel(
        ChampionRef(model_name="m", version="3", uri="models:/m@champion"),
        load_onnx_classifier(work / "onnx" / ExportResult.ONNX),
    )
    evaluation, preds = evaluate(
        snapshot, [work / "baseline" / "candidate"], champion, EvaluateConfig(bootstrap_samples=200)
    )
    base, champ = evaluation.score("baseline"), evaluation.champion_score()
    assert champ is not None and champ.version == "3"
    # the champion is the same network run through onnxruntime: identical predictions
    assert np.array_equal(preds["baseline"], preds["champion"])
    assert base.accuracy == champ.accuracy
    assert evaluation.mcnemar_p_value == 1.0
    assert base.n == snapshot.counts["test"] == evaluation.test_size
    assert base.accuracy_ci95[0] <= base.accuracy <= base.accuracy_ci95[1]
    assert sum(map(sum, base.confusion_matrix)) == base.n
    # the pixel references, fitted on the train split, scored on the same test images
    references = {s.name: s for s in evaluation.scores if s.kind == "reference"}
    assert set(references) == {"reference-logreg-pixels", "reference-majority"}
    assert all(r.n == base.n for r in references.values())
    train_labels = [e.label for e in snapshot.split("train")]
    majority = max(snapshot.class_names, key=train_labels.count)
    test_share = sum(e.label == majority for e in snapshot.split("test")) / base.n
    assert references["reference-majority"].accuracy == pytest.approx(test_share)
    assert evaluation.reference_score() == max(references.values(), key=lambda r: r.accuracy)
    assert evaluation.winner in {"baseline"}  # a reference never wins: only the gate reads it


def test_finetune_must_beat_baseline_by_the_margin() -> None:
    assert (
        choose_winner(model_score("baseline", 0.90), [model_score("finetune-full", 0.905)], 0.01)[0]
        == "baseline"
    )
    name, reason = choose_winner(model_score("baseline", 0.90), [model_score("finetune-full", 0.93)], 0.01)
    assert name == "finetune-full" and "+0.0300" in reason


@pytest.mark.parametrize(
    ("test_accuracy", "val_accuracy", "winner", "phrase"),
    [
        (0.895, 0.96, "finetune-full", "pooled"),  # within the margin on test, clearly ahead on val
        (0.905, 0.88, "baseline", "not ahead"),  # within the margin, pooled a tie: the baseline stays
        (0.85, 1.00, "baseline", "-0.0500"),  # a clear test-split loss is never overruled by validation
        (0.93, 0.50, "finetune-full", "+0.0300"),  # a clear test-split win needs no validation
    ],
)
def test_within_the_margin_validation_and_test_images_pooled_decide(
    test_accuracy: float, val_accuracy: float, winner: str, phrase: str
) -> None:
    val = {"baseline": HeldOut(0.90, 50), "finetune-full": HeldOut(val_accuracy, 50)}
    name, reason = choose_winner(
        model_score("baseline", 0.90), [model_score("finetune-full", test_accuracy)], 0.01, val
    )
    assert name == winner and phrase in reason, reason


@pytest.mark.parametrize(
    ("finetuned_loss", "winner", "phrase"),
    [
        (0.40, "finetune-full", "lower in cross-entropy there (0.450 vs 0.700)"),
        (1.20, "baseline", "not lower in cross-entropy: 0.850 vs 0.700"),
        (None, "baseline", "not ahead"),  # no loss recorded (an older candidate): the tie keeps the baseline
    ],
)
def test_a_pooled_tie_goes_to_the_lower_cross_entropy(
    finetuned_loss: float | None, winner: str, phrase: str
) -> None:
    """10 validation + 10 test images: 8 of 20 right each is a tie that the losses can still break."""
    baseline = model_score("baseline", 0.40, n=10).model_copy(update={"log_loss": 0.70})
    finetuned = model_score("finetune-full", 0.40, n=10).model_copy(update={"log_loss": finetuned_loss})
    val = {"baseline": HeldOut(0.40, 10, 0.70), "finetune-full": HeldOut(0.40, 10, 0.50)}
    name, reason = choose_winner(baseline, [finetuned], 0.01, val)
    assert name == winner and phrase in reason, reason


@pytest.mark.parametrize(
    ("finetuned_test", "finetuned_val", "winner", "phrase"),
    [
        (0.5, 0.9, "finetune-full", "one test image from the baseline"),  # -1 image: pooled 14 vs 12 right
        (0.7, 0.1, "baseline", "one test image ahead"),  # +1 image: pooled 8 vs 12 right
        (0.4, 1.0, "baseline", "-0.2000"),  # two images behind is a clear loss, whatever validation says
        (0.8, 0.1, "finetune-full", "+0.2000"),  # two images ahead is a clear win
    ],
)
def test_on_a_tiny_test_split_one_image_either_way_does_not_decide_alone(
    finetuned_test: float, finetuned_val: float, winner: str, phrase: str
) -> None:
    baseline = model_score("baseline", 0.6, n=10)
    val = {"baseline": HeldOut(0.6, 10), "finetune-full": HeldOut(finetuned_val, 10)}
    name, reason = choose_winner(baseline, [model_score("finetune-full", finetuned_test, n=10)], 0.01, val)
    assert name == winner and phrase in reason, reason
    if abs(finetuned_test - 0.6) < 0.15:  # without validation figures the test split still decides
        alone = choose_winner(baseline, [model_score("finetune-full", finetuned_test, n=10)], 0.01)[0]
        assert alone == ("finetune-full" if finetuned_test > 0.6 else "baseline")


def test_mcnemar_exact_known_values() -> None:
    y = np.zeros(20, dtype=int)
    a = np.zeros(20, dtype=int)
    b = np.zeros(20, dtype=int)
    b[:8] = 1  # B wrong on 8 images A gets right, never the reverse
    assert mcnemar_exact(y, a, b) == pytest.approx(2 * 0.5**8)
    assert mcnemar_exact(y, a, a) == 1.0


def test_gate_first_run_uses_absolute_thresholds_only() -> None:
    assert decide_gate(model_score("w", 0.9), None, export_result(), None, GateConfig()).promote
    low = decide_gate(model_score("w", 0.5), None, export_result(), None, GateConfig(min_accuracy=0.8))
    assert not low.promote and any("below min_accuracy" in r for r in low.reasons)


def test_gate_refuses_an_equal_model_and_says_why() -> None:
    decision = decide_gate(
        model_score("w", 0.9), model_score("champion", 0.9), export_result(), 1.0, GateConfig()
    )
    assert not decision.promote
    assert any("not better than champion v1" in r for r in decision.reasons)


def test_gate_refuses_a_winner_that_a_pixel_reference_beats_and_names_both_scores() -> None:
    reference = model_score("reference-logreg-pixels", 0.92).model_copy(update={"kind": "reference"})

    def gate(accuracy: float, cfg: GateConfig) -> GateDecision:
        return decide_gate(model_score("w", accuracy), None, export_result(), None, cfg, reference=reference)

    refused = gate(0.9, GateConfig())
    assert not refused.promote
    assert "does not beat the reference reference-logreg-pixels: 0.9000 vs 0.9200" in " ".join(
        refused.reasons
    )
    assert not gate(0.92, GateConfig()).promote  # beating means doing better
    assert gate(0.96, GateConfig()).promote
    assert not gate(0.96, GateConfig(reference_margin=0.05)).promote
    assert gate(0.98, GateConfig(reference_margin=0.05)).promote
    off = gate(0.5, GateConfig(min_accuracy=0.1, reference_margin=None))
    assert off.promote and "gate.reference_margin=null: not checked" in " ".join(off.reasons)


def test_gate_parity_latency_and_significance() -> None:
    assert not decide_gate(
        model_score("w", 0.9), None, export_result(passed=False), None, GateConfig()
    ).promote
    assert not decide_gate(
        model_score("w", 0.9), None, export_result(latency_ms=999), None, GateConfig()
    ).promote
    cfg = GateConfig(require_significance=True, alpha=0.05)
    better = (model_score("w", 0.95), model_score("champion", 0.90), export_result())
    assert not decide_gate(*better, 0.2, cfg).promote
    assert decide_gate(*better, 0.01, cfg).promote


def test_file_lease_is_exclusive_and_times_out(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "m.lock"
    first = FileLease(path, wait_seconds=5)
    first.acquire()
    second = FileLease(path, wait_seconds=0.2)
    with pytest.raises(LeaseError, match="still held"):
        second.acquire()
    assert json.loads(path.with_suffix(".holder").read_text())["holder"] == first.holder
    first.release()
    second.acquire()
    second.release()


def test_file_lease_serialises_threads(tmp_path: Path) -> None:
    assert peak_concurrency(lambda: FileLease(tmp_path / "l.lock", wait_seconds=30), 6) == 1


def test_registry_promotion_history_and_rollback(exported, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Against a real embedded MLflow store: publish, promote, refuse an equal model, roll back."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from adaptflow.contracts import Candidate, Evaluation
    from adaptflow.promotion import PromotionInputs, promote_under_lease, read_audit, rollback
    from adaptflow.publish import Publication, publish_model
    from adaptflow.registry import get_champion
    from adaptflow.tracking import TrackingContext, embedded_tracking_uri, ensure_experiment

    settings, snapshot, work, export = exported
    uri = embedded_tracking_uri(tmp_path)
    exp = ensure_experiment(uri, "t", tmp_path)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    parent = client.create_run(exp).info.run_id
    ctx = TrackingContext(uri, exp, parent)
    candidate = Candidate.load(work / "baseline" / "candidate")
    lease = FileLease(tmp_path / "lease.lock")
    cfg = GateConfig(min_accuracy=0.0)

    def one_run(
        champion_score: ModelScore | None, champion: ChampionRef | None, reference: float = 0.5
    ) -> tuple[str, bool]:
        floor = model_score("reference-logreg-pixels", reference).model_copy(update={"kind": "reference"})
        scores = (model_score("baseline", 0.9), floor) + ((champion_score,) if champion_score else ())
        evaluation = Evaluation(
            scores=scores,
            winner="baseline",
            winner_reason="r",
            champion=champion,
            test_size=200,
            fingerprint=snapshot.fingerprint,
        )
        with mlflow.start_run(experiment_id=exp, parent_run_id=parent) as run:
            version = publish_model(
                Publication(
                    work / "onnx" / "model.onnx",
                    candidate,
                    snapshot,
                    evaluation,
                    export,
                    settings,
                    ctx,
                    run.info.run_id,
                )
            )
            decision, _, _ = promote_under_lease(
                PromotionInputs(
                    uri,
                    settings.registry.model_name,
                    version,
                    model_score("baseline", 0.9),
                    evaluation,
                    export,
                    cfg,
                    {"pipeline": parent, "register": run.info.run_id},
                ),
                lease,
                lambda ref: pytest.fail("the champion did not move: nothing to re-score"),
            )
        return version, decision.promote

    v0, promoted0 = one_run(None, None, reference=0.95)  # a linear model on pixels does better
    assert not promoted0 and get_champion(uri, settings.registry.model_name) is None
    tags = client.get_model_version(settings.registry.model_name, v0).tags
    assert tags["adaptflow.gate.decision"] == "rejected"
    assert (
        "does not beat the reference reference-logreg-pixels: 0.9000 vs 0.9500"
        in tags["adaptflow.gate.reasons"]
    )
    v1, promoted1 = one_run(None, None)
    assert promoted1 and get_champion(uri, settings.registry.model_name).version == v1  # type: ignore[union-attr]
    ref = get_champion(uri, settings.registry.model_name)
    v2, promoted2 = one_run(model_score("champion", 0.9), ref)
    assert not promoted2
    mv = client.get_model_version(settings.registry.model_name, v2)
    assert mv.tags["adaptflow.data_fingerprint"] == snapshot.fingerprint
    assert str(client.get_model_version_by_alias(settings.registry.model_name, "challenger").version) == v2
    # force a promotion of v2 to have something to roll back
    client.set_registered_model_alias(settings.registry.model_name, "champion", v2)
    from adaptflow.promotion import AuditRecord, append_audit

    append_audit(
        uri,
        AuditRecord(
            "promote", settings.registry.model_name, v2, v1, "manual", {}, {}, "t", lease.uri, "t", 1.0
        ),
        parent,
    )
    record = rollback(uri, settings.registry.model_name, lease, None, parent, "bad model")
    assert record.new_champion == v1 and record.previous_champion == v2
    assert get_champion(uri, settings.registry.model_name).version == v1  # type: ignore[union-attr]
    trail = read_audit(uri, settings.registry.model_name)
    assert [r["action"] for r in trail] == ["promote", "promote", "rollback"]


def test_missing_champion_is_none(tmp_path: Path) -> None:
    from adaptflow.registry import get_champion
    from adaptflow.tracking import embedded_tracking_uri

    assert get_champion(embedded_tracking_uri(tmp_path), "never-registered") is None


def test_unreachable_tracking_server_is_a_clear_error() -> None:
    from adaptflow.errors import StoreError
    from adaptflow.tracking import check_tracking_reachable

    with pytest.raises(StoreError, match="unreachable") as info:
        check_tracking_reachable("http://127.0.0.1:9")
    assert "MLFLOW_TRACKING_URI" in (info.value.hint or "")


def test_registry_config_defaults() -> None:
    assert RegistryConfig().model_name == "adaptflow-digits"  # README: models:/adaptflow-digits@champion
