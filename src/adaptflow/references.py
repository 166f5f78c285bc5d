"""The reference floor: two cheap models every candidate must beat before it may be promoted.

A user adopts adaptflow to get a better model than their own script. On small or low-resolution
data a linear model on pixels can beat a fine-tuned network, so the evaluate stage fits, on the
train split, scikit-learn's ``LogisticRegression`` on downsampled grayscale pixels and a
majority-class ``DummyClassifier``, and scores both on the same test split as every candidate
(:func:`adaptflow.evaluation.evaluate` scores them). The gate refuses a winner that does not beat the better of
the two by ``gate.reference_margin``. Scikit-learn because it is the reference users would write
themselves, well kept, and fits these in seconds.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from adaptflow.config import EvaluateConfig
from adaptflow.contracts import ManifestEntry, Snapshot
from adaptflow.data.images import ImageStore

log = logging.getLogger(__name__)

LOGREG = "reference-logreg-pixels"
MAJORITY = "reference-majority"


def pixel_features(entries: list[ManifestEntry], store: ImageStore, side: int) -> np.ndarray:
    """Each image as ``side`` x ``side`` grayscale pixels in [0, 1], one row per image."""
    from PIL import Image

    rows = [
        np.asarray(store.image(e).convert("L").resize((side, side), Image.Resampling.BILINEAR), np.float32)
        for e in entries
    ]
    return np.stack(rows).reshape(len(entries), -1) / 255.0


def predict_references(snapshot: Snapshot, cfg: EvaluateConfig, store: ImageStore) -> dict[str, np.ndarray]:
    """Each reference's test-split predictions (class indices), fitted on the train split."""
    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    index = {c: i for i, c in enumerate(snapshot.class_names)}
    train, test = snapshot.split("train"), snapshot.split("test")
    x_train, x_test = (pixel_features(split, store, cfg.reference_pixels) for split in (train, test))
    y_train = np.array([index[e.label] for e in train], dtype=np.int64)
    models = {
        LOGREG: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1)),
        MAJORITY: DummyClassifier(strategy="most_frequent"),
    }
    predictions = {name: model.fit(x_train, y_train).predict(x_test) for name, model in models.items()}
    log.info(
        "evaluate: references fitted in %.1fs on %d images of %dx%d grayscale pixels",
        *(time.perf_counter() - started, len(train), cfg.reference_pixels, cfg.reference_pixels),
    )
    return predictions
