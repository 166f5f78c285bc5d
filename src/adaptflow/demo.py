"""Assets for the main job: demo data and the source-pretrained backbone, made once and cached."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from adaptflow.data.demo import TARGET_TREES
from adaptflow.logs import console

log = logging.getLogger(__name__)

__all__ = ["TARGET_TREES", "DemoAssets", "prepare_demo"]

DEMO_WEIGHTS = "resnet18-digits-source.safetensors"


@dataclass(frozen=True)
class DemoAssets:
    data: Path
    weights: Path
    sha256: str

    @property
    def weights_uri(self) -> str:
        return self.weights.as_uri()


def prepare_demo(workdir: Path, size: int = 32, pretrain_epochs: int = 8) -> DemoAssets:
    from adaptflow.data.demo import DEMO_DATA_VERSION, write_demo_data
    from adaptflow.training.pretrain import pretrain

    data = workdir / "demo" / "data"
    marker = data / ".complete"
    if not marker.exists() or marker.read_text().strip() != DEMO_DATA_VERSION:
        console().info("demo: writing digits demo data to %s", data)
        write_demo_data(data, size=size)
        marker.write_text(DEMO_DATA_VERSION + "\n")
    weights = workdir / "demo" / "backbone" / DEMO_WEIGHTS
    sidecar = weights.with_name(weights.name + ".json")
    if not (weights.exists() and sidecar.exists()):
        console().info("demo: pretraining resnet18 on the source task (digits 0-4)")
        pretrain(data / "source", "resnet18", weights, input_size=size, epochs=pretrain_epochs)
    sha = json.loads(sidecar.read_text())["sha256"]
    return DemoAssets(data, weights, sha)
