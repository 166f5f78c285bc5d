"""The evaluate stage: every candidate and the current champion, scored on the same test split.

Metrics come from scikit-learn; accuracy gets a bootstrap 95% interval, and the winner is
compared with the champion by McNemar's exact test on the very same images. Fine-tuning wins
over transfer learning only when it is better by ``finetune_margin`` (it costs more to train,
serve-side risk of overfitting included): the seed's advice is transfer unless fine-tuning pays.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptflow.config import EvaluateConfig
from adaptflow.contracts import Candidate, ChampionRef, Evaluation, ManifestEntry, ModelScore, Snapshot
from adaptflow.data.images import ImageStore, eval_transform
from adaptflow.logs import console
from adaptflow.onnx_model import OnnxClassifier, load_onnx_classifier
from adaptflow.promotion import ChampionRescore
from adaptflow.references import predict_references
from adaptflow.registry import download_onnx

# torch is imported where it is used: register imports this module for rescore_champion, which a
# run needs only when the champion moved, and a stage process that never touches torch saves ~1.5 s

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pooled:
    correct: int
    images: int
    loss: float | None  # mean cross-entropy over the pooled images, where both halves have one


@dataclass(frozen=True)
class HeldOut:
    """A candidate's validation split figures, pooled with its test score by :func:`choose_winner`."""

    accuracy: float
    images: int
    loss: float | None = None

    def pooled(self, test: ModelScore) -> Pooled:
        correct = round(self.accuracy * self.images) + round(test.accuracy * test.n)
        loss = None
        if self.loss is not None and test.log_loss is not None:
            loss = (self.loss * self.images + test.log_loss * test.n) / max(self.images + test.n, 1)
        return Pooled(correct, self.images + test.n, loss)


@dataclass(frozen=True)
class ChampionModel:
    ref: ChampionRef
    model: OnnxClassifier


def candidate_logits(folder: Path, entries: list[ManifestEntry], store: ImageStore, batch: int) -> np.ndarray:
    import torch

    from adaptflow.training.candidates import load_candidate

    candidate, model = load_candidate(folder)
    transform = eval_transform(candidate.preprocessing)
    logits: list[np.ndarray] = []
    with torch.inference_mode():
        for i in range(0, len(entries), batch):
            x = torch.stack([transform(store.image(e)) for e in entries[i : i + batch]])
            logits.append(model(x).float().numpy())
    return np.concatenate(logits) if logits else np.zeros((0, len(candidate.class_names)), dtype=np.float32)


def mean_cross_entropy(logits: np.ndarray, y_true: np.ndarray) -> float | None:
    """The test split's mean cross-entropy (nats): the tie-breaker when accuracies tie."""
    if len(y_true) == 0:
        return None
    import torch

    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_true))
    value = float(loss)
    return value if np.isfinite(value) else None


def score_candidate(
    folder: Path,
    name: str,
    entries: list[ManifestEntry],
    y_true: np.ndarray,
    classes: tuple[str, ...],
    cfg: EvaluateConfig,
    store: ImageStore,
) -> tuple[ModelScore, np.ndarray]:
    """A saved candidate scored on ``entries`` (its cross-entropy included); also its predictions."""
    logits = candidate_logits(folder, entries, store, cfg.batch_size)
    predictions = logits.argmax(1)
    loss = mean_cross_entropy(logits, y_true)
    return score(name, "candidate", y_true, predictions, classes, cfg, log_loss=loss), predictions


def predict_onnx(
    model: OnnxClassifier, entries: list[ManifestEntry], store: ImageStore, batch: int
) -> np.ndarray:
    import torch

    transform = eval_transform(model.preprocessing)
    preds = [
        model.logits(torch.stack([transform(store.image(e)) for e in entries[i : i + batch]]).numpy()).argmax(
            1
        )
        for i in range(0, len(entries), batch)
    ]
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def bootstrap_ci(correct: np.ndarray, samples: int, seed: int = 0) -> tuple[float, float]:
    if len(correct) == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(samples, len(correct)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def score(
    name: str,
    kind: str,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: tuple[str, ...],
    cfg: EvaluateConfig,
    version: str | None = None,
    log_loss: float | None = None,
) -> ModelScore:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(range(len(classes)))
    precision, recall, _, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return ModelScore(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        version=version,
        accuracy=float(accuracy_score(y_true, y_pred)),
        accuracy_ci95=bootstrap_ci((y_true == y_pred).astype(np.float64), cfg.bootstrap_samples),
        macro_f1=float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        per_class_precision={c: float(p) for c, p in zip(classes, precision, strict=True)},
        per_class_recall={c: float(r) for c, r in zip(classes, recall, strict=True)},
        confusion_matrix=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        n=len(y_true),
        log_loss=log_loss,
    )


def score_champion(
    champion: ChampionModel, snapshot: Snapshot, cfg: EvaluateConfig, store: ImageStore
) -> tuple[ChampionRescore, np.ndarray | None]:
    """The champion's score and predictions on this snapshot's test split.

    A champion trained on another class set is not comparable: it gets no score, and the note says
    why, so the gate falls back to the absolute thresholds and its reasons say so.
    """
    classes = snapshot.class_names
    if set(champion.model.class_names) != set(classes):
        return ChampionRescore(
            None,
            f"champion v{champion.ref.version} predicts classes {list(champion.model.class_names)}, "
            f"this data has {list(classes)}: not comparable, so the absolute thresholds decide",
        ), None
    test = snapshot.split("test")
    index = {c: i for i, c in enumerate(classes)}
    y_true = np.array([index[e.label] for e in test], dtype=np.int64)
    raw = predict_onnx(champion.model, test, store, cfg.batch_size)
    remap = np.array([index[c] for c in champion.model.class_names])  # its class order onto ours
    predictions = remap[raw] if len(raw) else raw
    scored = score("champion", "champion", y_true, predictions, classes, cfg, champion.ref.version)
    return ChampionRescore(scored), predictions


def rescore_champion(
    ref: ChampionRef,
    snapshot: Snapshot,
    tracking_uri: str,
    cfg: EvaluateConfig,
    store: ImageStore | None = None,
) -> ChampionRescore:
    """Fetches the registered champion version and scores it on this snapshot's test split."""
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"models:/{ref.model_name}/{ref.version}"  # the version seen under the lease, not the alias
        model = load_onnx_classifier(download_onnx(uri, tmp, tracking_uri))
    return score_champion(ChampionModel(ref, model), snapshot, cfg, store or ImageStore())[0]


def mcnemar_exact(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value: are A and B's error rates on the same images different?"""
    from scipy.stats import binomtest

    a_right, b_right = pred_a == y_true, pred_b == y_true
    only_a, only_b = int(np.sum(a_right & ~b_right)), int(np.sum(~a_right & b_right))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def choose_winner(
    baseline: ModelScore,
    others: list[ModelScore],
    margin: float,
    val: Mapping[str, HeldOut] | None = None,
) -> tuple[str, str]:
    """The best fine-tuned candidate wins when it beats the baseline by ``margin`` test accuracy.

    Within the margin the test split cannot tell them apart, and on a split where one image is
    worth more than the margin (under 100 images at the default 0.01) neither can a one-image
    difference either way. Then, with ``val`` (name -> its validation accuracy, images and loss) the
    pooled held-out images, validation plus test, decide. When they tie too, as they mostly do on
    20 images, the lower pooled cross-entropy decides: it grades every image, not only the
    right-or-wrong ones. Only a tie there as well keeps the baseline. Validation images chose each
    candidate's best epoch, which flatters fine-tuning a little; the margin still guards any clear
    test-split result either way.
    """
    best = max(others, key=lambda s: s.accuracy, default=None)
    if best is None:
        return baseline.name, "only the transfer-learning baseline was trained"
    gain = best.accuracy - baseline.accuracy
    versus = f"({best.accuracy:.4f} vs {baseline.accuracy:.4f})"
    n = max(min(best.n, baseline.n), 1)
    # On a split where one image is worth more than the margin, one image either way is noise
    one_image = 1.0 / n > margin and abs(round(gain * n)) <= 1
    can_pool = val is not None and best.name in val and baseline.name in val
    if gain >= margin and not (one_image and can_pool):
        return best.name, (
            f"{best.name} beats the transfer-learning baseline by {gain:+.4f} test accuracy "
            f"{versus}, at least the finetune_margin {margin:.4f}"
        )
    pooled_decides = can_pool and (gain > -margin or one_image)
    tail = ""
    if val is not None and pooled_decides:
        within = (
            f"{best.name} is one test image from the baseline ({gain:+.4f}, {versus}; one image is more than "
            f"the finetune_margin {margin:.4f} on {n} images)"
            if one_image and abs(gain) >= margin
            else f"{best.name} is within the finetune_margin {margin:.4f} of the baseline on the test split "
            f"({gain:+.4f}, {versus})"
        )
        ours, theirs = val[best.name].pooled(best), val[baseline.name].pooled(baseline)
        if ours.correct > theirs.correct:
            return best.name, (
                f"{within} and ahead on validation and test images pooled "
                f"({ours.correct} vs {theirs.correct} of {ours.images} right)"
            )
        tail = " and not ahead on validation and test images pooled"
        if ours.correct == theirs.correct and ours.loss is not None and theirs.loss is not None:
            if ours.loss < theirs.loss:
                return best.name, (
                    f"{within}, tied on validation and test images pooled ({ours.correct} of {ours.images} "
                    f"right each) and lower in cross-entropy there ({ours.loss:.3f} vs {theirs.loss:.3f})"
                )
            tail += f" (tied, and not lower in cross-entropy: {ours.loss:.3f} vs {theirs.loss:.3f})"
    if gain >= margin:  # only a one-image lead on a small split gets here
        return baseline.name, f"transfer learning kept: {best.name} is one test image ahead {versus}{tail}"
    return baseline.name, (
        f"transfer learning kept: {best.name} is {gain:+.4f} vs the baseline {versus}, less than the "
        f"finetune_margin {margin:.4f} that would pay for fine-tuning{tail}"
    )


def score_references(snapshot: Snapshot, cfg: EvaluateConfig, store: ImageStore) -> list[ModelScore]:
    """The pixel references (:mod:`adaptflow.references`) scored like every candidate."""
    index = {c: i for i, c in enumerate(snapshot.class_names)}
    y_true = np.array([index[e.label] for e in snapshot.split("test")], dtype=np.int64)
    return [
        score(name, "reference", y_true, predictions, snapshot.class_names, cfg)
        for name, predictions in predict_references(snapshot, cfg, store).items()
    ]


def evaluate(
    snapshot: Snapshot,
    candidate_dirs: list[Path],
    champion: ChampionModel | None,
    cfg: EvaluateConfig,
    store: ImageStore | None = None,
    champion_note: str | None = None,
) -> tuple[Evaluation, dict[str, np.ndarray]]:
    """Scores; returns the evaluation and each model's test predictions (for plots and tests)."""
    store = store or ImageStore()
    test = snapshot.split("test")
    classes = snapshot.class_names
    index = {c: i for i, c in enumerate(classes)}
    y_true = np.array([index[e.label] for e in test], dtype=np.int64)
    scores: list[ModelScore] = []
    predictions: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    val: dict[str, HeldOut] = {}
    val_images = len(snapshot.split("val"))
    diverged: dict[str, str] = {}  # name -> where its training stopped; never the winner
    for folder in candidate_dirs:
        candidate = Candidate.load(folder)
        if candidate.name in seen:
            continue  # the Else branch re-emits the baseline; score it once
        seen.add(candidate.name)
        if tuple(candidate.class_names) != classes:
            raise ValueError(f"candidate {candidate.name} was trained on other classes than this snapshot")
        scored, predictions[candidate.name] = score_candidate(
            folder, candidate.name, test, y_true, classes, cfg, store
        )
        scores.append(scored)
        if Candidate.DIVERGED in candidate.extra:
            diverged[candidate.name] = candidate.extra[Candidate.DIVERGED]
        val[candidate.name] = HeldOut(
            candidate.metrics["val_accuracy"], val_images, candidate.metrics.get("val_loss")
        )

    baseline = next(s for s in scores if s.name == "baseline")
    others = [s for s in scores if s.name != "baseline" and s.name not in diverged]
    winner, reason = choose_winner(baseline, others, cfg.finetune_margin, val)
    if diverged:
        lost = "; ".join(f"{name} diverged ({where}) and cannot win" for name, where in diverged.items())
        reason = f"{lost}; the transfer-learning baseline wins" if not others else f"{lost}; {reason}"
    scores += score_references(snapshot, cfg, store)

    p_value: float | None = None
    champion_ref: ChampionRef | None = None
    if champion is not None:
        rescored, champion_predictions = score_champion(champion, snapshot, cfg, store)
        if rescored.score is None or champion_predictions is None:
            champion_note = rescored.note
        else:
            champion_ref = champion.ref
            predictions["champion"] = champion_predictions
            scores.append(rescored.score)
            p_value = mcnemar_exact(y_true, predictions[winner], champion_predictions)
    for s in scores:
        log.info(
            "evaluate: %-16s accuracy %.4f [%.4f, %.4f] macro-F1 %.4f",
            s.name,
            s.accuracy,
            *s.accuracy_ci95,
            s.macro_f1,
        )
    console().info("evaluate: winner %s: %s", winner, reason)
    evaluation = Evaluation(
        scores=tuple(scores),
        winner=winner,
        winner_reason=reason,
        champion=champion_ref,
        champion_note=champion_note,
        mcnemar_p_value=p_value,
        test_size=len(test),
        fingerprint=snapshot.fingerprint,
    )
    return evaluation, predictions


def evaluate_against_champion(
    snapshot: Snapshot,
    candidate_dirs: list[Path],
    cfg: EvaluateConfig,
    tracking_uri: str,
    model_name: str,
    out_dir: str | Path,
) -> Evaluation:
    """The evaluate stage as the pipeline runs it: the registered champion (if any) fetched and scored
    beside the candidates; the evaluation is saved under ``out_dir``."""
    from adaptflow.registry import get_champion

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = get_champion(tracking_uri, model_name)
    with tempfile.TemporaryDirectory() as tmp:
        champion = None
        if ref is not None:
            champion = ChampionModel(ref, load_onnx_classifier(download_onnx(ref.uri, tmp, tracking_uri)))
        note = None if ref else "no champion registered yet"
        evaluation, _ = evaluate(snapshot, candidate_dirs, champion, cfg, champion_note=note)
    evaluation.save(out)
    return evaluation
