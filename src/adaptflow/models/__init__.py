"""Models: one factory for backbones + heads, and weight resolution with verification."""

from adaptflow.models.factory import BACKBONES, Classifier, build_model, list_backbones

__all__ = ["BACKBONES", "Classifier", "build_model", "list_backbones"]
