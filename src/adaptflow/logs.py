"""Logging to stderr (stdout stays clean for ``--json``)."""

from __future__ import annotations

import logging
import sys

NOISY = (
    "onnxscript",
    "onnx_ir",
    "alembic",
    "mlflow.store.db",
    "urllib3",
    "botocore",
    "matplotlib",
    "PIL",
    "torch.onnx",
)


def setup_logging(level: str | int = "INFO") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_adaptflow", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._adaptflow = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
