"""Saving and loading candidates: ``candidate.json`` + ``model.safetensors`` in one folder."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adaptflow.contracts import Candidate
from adaptflow.models.factory import Classifier, build_model
from adaptflow.models.weights import check_finite


def save_candidate(candidate: Candidate, model: Classifier, folder: str | Path) -> Path:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (Candidate.WEIGHTS + ".partial")
    save_file(state, str(tmp))
    tmp.replace(out / Candidate.WEIGHTS)
    candidate.save(out)
    return out


def load_candidate(folder: str | Path, device: torch.device | str = "cpu") -> tuple[Candidate, Classifier]:
    folder = Path(folder)
    candidate = Candidate.load(folder)
    model = build_model(candidate.backbone.name, len(candidate.class_names))
    state = check_finite(load_file(str(folder / Candidate.WEIGHTS)), f"candidate {candidate.name}")
    model.load_state_dict(state)
    return candidate, model.to(device).eval()
