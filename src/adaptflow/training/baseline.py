"""The baseline stage: transfer learning with a frozen backbone and a new linear head.

Backbone features are computed once per image (cached on disk), the head trains on them in
seconds, and the advisor decides from measured signals whether fine-tuning is worth it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adaptflow.config import BackboneSpec, BaselineConfig, FinetuneConfig, Settings
from adaptflow.contracts import BaselineResult, Candidate, Snapshot
from adaptflow.data.images import ImageStore
from adaptflow.logs import console
from adaptflow.models.factory import Classifier, build_model, count_parameters
from adaptflow.models.weights import ResolvedWeights, resolve_weights
from adaptflow.training.advisor import SignalValue, advise, choose_strategy
from adaptflow.training.batches import eval_batches, eval_loader, finetune_train_loader, train_batches
from adaptflow.training.candidates import save_candidate
from adaptflow.training.cost import CostEstimate, estimate_cost
from adaptflow.training.decoded import DecodedImages, decode_split, decoded_cache_dir
from adaptflow.training.features import FeatureCache, cache_namespace, extract_features
from adaptflow.training.probe import train_linear_probe
from adaptflow.training.runtime import pick_device, reset_peak_memory, seed_everything
from adaptflow.training.schedule import Schedule, plan_schedule
from adaptflow.training.shift import BatchNormMoments
from adaptflow.training.strategies import schedule_epochs
from adaptflow.training.transfer_gap import probe_cv_accuracy, source_task, transfer_gap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselineInputs:
    snapshot: Snapshot
    spec: BackboneSpec
    weights: ResolvedWeights
    cfg: BaselineConfig
    finetune: FinetuneConfig
    feature_cache_dir: Path
    seed: int = 0
    decoded_cache_dir: Path | None = None  # decoded images (training/decoded.py); None: in memory only


def shift_sample_rows(train_images: int, sample_images: int) -> list[int]:
    """An even sample of at most ``sample_images`` training rows, for the BatchNorm shift signal."""
    step = max(1, -(-train_images // sample_images))  # ceil: at most N images
    return list(range(0, train_images, step))


def measure_finetune_cost(
    model: Classifier,
    train: DecodedImages,
    val: DecodedImages,
    inputs: BaselineInputs,
    device: torch.device,
    strategy: str,
    forward_images_per_second: float | None = None,
) -> tuple[Schedule, CostEstimate]:
    """The fine-tuning schedule and what it will cost, timed through the real loaders (training/cost.py)."""
    ft = inputs.finetune.model_copy(update={"strategy": strategy})
    pre = inputs.weights.preprocessing
    schedule = plan_schedule(len(train), ft)
    train_loader = finetune_train_loader(train, ft, schedule.batch_size, inputs.seed)
    transforms = (train_batches(pre, ft.augment), eval_batches(pre))
    cost = estimate_cost(
        model, train_loader, eval_loader(val), schedule, ft, device, transforms, forward_images_per_second
    )
    # the budget caps the planned epochs at the measured epoch time (rounded as the signal records it)
    capped = plan_schedule(len(train), ft, round(cost.epoch_seconds, 4), inputs.cfg.advisor.budget_seconds)
    return capped, cost.for_schedule(capped, schedule_epochs(model, ft))


#: from this many validation images on, the probe's validation accuracy is precise enough (standard
#: error at most 2.2 points) to stand for the cross-validated one, whose k refits cost more than
#: the extraction pass at 32 px (bench/baseline.py)
CV_UNTIL_VAL_IMAGES = 500


def measure_transfer_gap(
    features: np.ndarray,
    labels: np.ndarray,
    classes: int,
    inputs: BaselineInputs,
    val_accuracy: float,
    val_images: int,
) -> tuple[float | None, float | None]:
    """(the probe's held-out accuracy, its gap to the source task) or Nones.

    Held out: cross-validated over train+val features when the validation split is small (with 10
    images per class it holds 2 per class, and one image moves its accuracy by 10 points); the
    probe's own validation accuracy from ``CV_UNTIL_VAL_IMAGES`` validation images on.
    """
    probe = (
        probe_cv_accuracy(features, labels, inputs.seed) if val_images < CV_UNTIL_VAL_IMAGES else val_accuracy
    )
    source = source_task(inputs.weights.meta)
    if probe is None or source is None:
        return probe, None
    return probe, transfer_gap(probe, classes, source)


def val_accuracy_lower_bound(accuracy: float, images: int) -> float:
    """The Wilson 95% lower bound: 38 of 38 validation images right is not yet 0.97 accuracy."""
    from scipy.stats import binomtest

    if images == 0:
        return 0.0
    return float(binomtest(round(accuracy * images), images).proportion_ci(method="wilson").low)


def run_baseline(
    inputs: BaselineInputs, out_dir: str | Path, store: ImageStore | None = None
) -> BaselineResult:
    start = time.perf_counter()
    seed_everything(inputs.seed)
    snapshot, cfg = inputs.snapshot, inputs.cfg
    store = store or ImageStore()
    device = pick_device(inputs.finetune.device)
    reset_peak_memory(device)
    classes = snapshot.class_names
    model = build_model(inputs.spec.name, len(classes))
    if inputs.weights.state_dict is not None:
        model.load_backbone_state(inputs.weights.state_dict)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.to(device)

    pre = inputs.weights.preprocessing
    cache = FeatureCache(
        inputs.feature_cache_dir, cache_namespace(inputs.spec.name, inputs.weights.sha256, pre)
    )
    train, val = snapshot.split("train"), snapshot.split("val")
    decoded_train = decode_split(train, classes, pre, store, inputs.decoded_cache_dir)
    decoded_val = decode_split(val, classes, pre, store, inputs.decoded_cache_dir)
    # the shift signal's sample is measured in the extraction pass: one backbone forward per image,
    # and none on a rerun (the value is cached with the features it came with)
    sample = shift_sample_rows(len(train), cfg.advisor.shift_sample_images)
    cached_shift = cache.get_shift([train[r] for r in sample])
    transform = eval_batches(pre)
    with BatchNormMoments(model.backbone) as moments:
        train_feats = extract_features(
            model,
            train,
            decoded_train,
            transform,
            cache,
            device,
            cfg.feature_batch_size,
            moments if cached_shift is False else None,
            sample,
        )
    val_feats = extract_features(model, val, decoded_val, transform, cache, device, cfg.feature_batch_size)
    feats = train_feats.followed_by(val_feats)
    shift = moments.shift() if cached_shift is False else cached_shift
    if cached_shift is False:
        cache.put_shift([train[r] for r in sample], shift)
    x_train = torch.from_numpy(feats.features[: len(train)])
    x_val = torch.from_numpy(feats.features[len(train) :])
    y_train, y_val = decoded_train.labels, decoded_val.labels

    head, loop = train_linear_probe(x_train, y_train, x_val, y_val, len(classes), cfg, inputs.seed)
    model.head.load_state_dict(head.state_dict())
    best = loop.best

    # Advisor signals, each measured here.
    train_counts = snapshot.class_counts["train"]
    probe_cv, gap = measure_transfer_gap(
        feats.features,
        np.concatenate([y_train.numpy(), y_val.numpy()]),
        len(classes),
        inputs,
        best.val_accuracy,
        len(val),
    )
    strategy: str = inputs.finetune.strategy
    if cfg.advisor.choose_strategy:
        strategy = choose_strategy(
            {"domain_shift": shift, "min_train_images_per_class": min(train_counts.values())},
            cfg.advisor,
            inputs.finetune,
        )[0]
    schedule, cost = measure_finetune_cost(
        model, decoded_train, decoded_val, inputs, device, strategy, feats.images_per_second
    )
    signals: dict[str, SignalValue] = {
        "baseline_val_accuracy": round(best.val_accuracy, 6),
        "baseline_val_accuracy_low": round(val_accuracy_lower_bound(best.val_accuracy, len(val)), 6),
        "val_images": len(val),
        "baseline_train_accuracy": round(best.train_accuracy, 6),
        "target_accuracy": cfg.advisor.target_accuracy,
        "min_train_images_per_class": min(train_counts.values()),
        "train_images": len(train),
        "domain_shift": None if shift is None else round(shift, 4),
        "probe_cv_accuracy": None if probe_cv is None else round(probe_cv, 4),
        "transfer_gap": None if gap is None else round(gap, 4),
        "train_images_per_second": round(cost.train_images_per_second, 2),
        "epoch_seconds": round(cost.epoch_seconds, 4),
        "planned_finetune_epochs": schedule.epochs,
        "expected_finetune_epochs": round(cost.expected_epochs, 1),
        "estimated_finetune_seconds": round(cost.seconds, 2),
        "max_finetune_seconds": round(cost.max_seconds, 2),
        "budget_seconds": cfg.advisor.budget_seconds,
    }
    decision = advise(signals, cfg.advisor, inputs.finetune)
    console().info("advisor: %s", decision.reason)

    trainable, total = count_parameters(head)[0], count_parameters(model)[1]
    candidate = Candidate(
        name="baseline",
        strategy="transfer",
        backbone=inputs.spec,
        backbone_sha256=inputs.weights.sha256,
        class_names=classes,
        preprocessing=pre,
        metrics=loop.best_metrics(),
        cost=loop.cost(start, device, params=(trainable, total), backbone_forward_images=feats.computed),
        history=tuple(loop.history),
        extra={
            "features_cached": str(feats.cached),
            "feature_images_per_second": f"{feats.images_per_second:.1f}" if feats.images_per_second else "",
            "weights_source": inputs.weights.source,
        },
    )
    save_candidate(candidate, model.cpu(), Path(out_dir) / "candidate")
    result = BaselineResult(candidate=candidate, decision=decision)
    result.save(out_dir)
    return result


def baseline_for(
    snapshot: Snapshot, settings: Settings, out_dir: str | Path, store: ImageStore | None = None
) -> BaselineResult:
    """The baseline stage as configured: weights resolved (and cached) and features cached under the workdir."""
    workdir = Path(settings.workdir).resolve()
    weights = resolve_weights(settings.backbone, workdir / "cache" / "weights")
    cache_dir = Path(settings.baseline.feature_cache_dir or workdir / "cache" / "features")
    inputs = BaselineInputs(
        snapshot,
        settings.backbone,
        weights,
        settings.baseline,
        settings.finetune,
        cache_dir,
        settings.seed,
        decoded_cache_dir(settings),
    )
    return run_baseline(inputs, out_dir, store)
