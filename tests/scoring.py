"""Scoring a saved candidate from the files on disk, independently of the metrics the code recorded."""

from __future__ import annotations

from pathlib import Path

import torch

from adaptflow.contracts import ManifestEntry
from adaptflow.data.images import decode_image, eval_transform
from adaptflow.training.candidates import load_candidate


def saved_candidate_accuracy(folder: Path, entries: list[ManifestEntry]) -> float:
    """Accuracy of the model saved in ``folder`` on ``entries``: fp32 on the CPU, one batch, argmax."""
    assert entries, "no images to score"
    candidate, model = load_candidate(folder)
    transform = eval_transform(candidate.preprocessing)
    x = torch.stack([transform(decode_image(Path(e.uri).read_bytes())) for e in entries])
    with torch.inference_mode():
        predicted = model.eval()(x).argmax(1).tolist()
    hits = sum(candidate.class_names[i] == e.label for i, e in zip(predicted, entries, strict=True))
    return hits / len(entries)
