"""crener: a reproduction suite for CRENER, a grid-tagging Chinese NER model."""

from crener.config import ModelConfig, RunConfig
from crener.data.schema import Entity, Sentence

__all__ = ["Entity", "ModelConfig", "RunConfig", "Sentence", "build_model"]
__version__ = "0.1.0"


def build_model(cfg, task, encoder, runtime=None):  # noqa: ANN001 - thin lazy re-export, see crener.registry
    """Build the model of family ``cfg.name`` (lazy import so the data layer does not load torch)."""
    from crener.registry import build_model as _build

    return _build(cfg, task, encoder, runtime)
