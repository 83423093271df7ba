"""crener: a reproduction suite for CRENER, a grid-tagging Chinese NER model."""

from crener.config import ModelConfig, RunConfig
from crener.data.schema import Entity, Sentence

__all__ = ["Entity", "ModelConfig", "RunConfig", "Sentence", "build_model"]
__version__ = "0.1.0"


def build_model(cfg, labels, encoder):  # noqa: ANN001 - thin lazy re-export, see crener.model
    """Build a model for ``cfg`` (lazy import so the data layer does not load torch)."""
    from crener.model import build_model as _build

    return _build(cfg, labels, encoder)
