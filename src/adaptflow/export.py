"""The export stage: winner -> ONNX, checked against PyTorch (see timm's ``onnx_export``).

The dynamo exporter with a dynamic batch axis; ``onnx.checker`` with ``full_check``; onnxruntime
against torch at several batch sizes, failing above the stated tolerance; the preprocessing
and class names written into the ONNX metadata, so every consumer builds the same transforms.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from adaptflow.config import ExportConfig
from adaptflow.contracts import ExportResult
from adaptflow.errors import ExportError
from adaptflow.logs import console
from adaptflow.onnx_model import (
    META_BACKBONE,
    META_CANDIDATE,
    META_CLASSES,
    META_PREPROCESSING,
    load_onnx_classifier,
)
from adaptflow.training.candidates import load_candidate

log = logging.getLogger(__name__)


def export_onnx(candidate_dir: str | Path, cfg: ExportConfig, out_dir: str | Path) -> ExportResult:
    import onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / ExportResult.ONNX
    candidate, model = load_candidate(candidate_dir)
    size = candidate.preprocessing.input_size
    example = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    start = time.perf_counter()
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: batch},),
            input_names=["input"],
            output_names=["logits"],
            opset_version=cfg.opset,
            verbose=False,
        )
        assert program is not None
        program.save(str(onnx_path))
    except Exception as error:
        raise ExportError(f"torch.onnx.export failed for {candidate.name}: {error}") from error
    proto = onnx.load(str(onnx_path))
    metadata = {
        META_PREPROCESSING: candidate.preprocessing.model_dump_json(),
        META_CLASSES: json.dumps(list(candidate.class_names)),
        META_CANDIDATE: candidate.name,
        META_BACKBONE: candidate.backbone.model_dump_json(),
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(onnx_path))
    onnx.checker.check_model(str(onnx_path), full_check=True)
    log.info("export: %s written in %.1fs, checker passed", onnx_path, time.perf_counter() - start)

    runner = load_onnx_classifier(onnx_path)
    generator = torch.Generator().manual_seed(0)
    parity: dict[str, float] = {}
    with torch.inference_mode():
        for n in cfg.parity_batch_sizes:
            x = torch.randn(n, 3, size, size, generator=generator)
            diff = float(np.max(np.abs(runner.logits(x.numpy()) - model(x).numpy())))
            parity[str(n)] = diff
    worst = max(parity.values())
    x1 = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    runner.logits(x1)  # warm-up
    timings = []
    for _ in range(cfg.latency_runs):
        t0 = time.perf_counter()
        runner.logits(x1)
        timings.append((time.perf_counter() - t0) * 1000)
    result = ExportResult(
        candidate=candidate.name,
        max_abs_diff=worst,
        parity=parity,
        tolerance=cfg.tolerance,
        passed=worst <= cfg.tolerance,
        latency_ms_p50=float(np.percentile(timings, 50)),
        latency_ms_p95=float(np.percentile(timings, 95)),
        opset=cfg.opset,
        size_bytes=onnx_path.stat().st_size,
    )
    result.save(out)
    console().info(
        "export: parity max |ort - torch| = %.2e at batch sizes %s (tolerance %.0e); p50 %.2f ms",
        worst,
        list(parity),
        cfg.tolerance,
        result.latency_ms_p50,
    )
    if not result.passed:
        raise ExportError(
            f"ONNX export of {candidate.name} differs from PyTorch by {worst:.2e} > tolerance {cfg.tolerance:.0e}",
            hint="the model uses an op the exporter translates inexactly; see export.json for per-batch figures",
        )
    return result
