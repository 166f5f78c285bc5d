"""Models: one factory for backbones + heads, and weight resolution with verification.

The factory's names are loaded on first use (PEP 562): it imports torch, and a stage that only
reads ``adaptflow.models.weights.init_label`` (register, the summary) does not need torch.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adaptflow.models.factory import BACKBONES, Classifier, build_model, list_backbones

__all__ = ["BACKBONES", "Classifier", "build_model", "list_backbones"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from adaptflow.models import factory

        return getattr(factory, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
