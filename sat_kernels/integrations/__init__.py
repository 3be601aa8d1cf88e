"""Integrations with training frameworks (imported lazily: they need ``transformers``)."""
from .trainer import SATCallback

__all__ = ["SATCallback"]
