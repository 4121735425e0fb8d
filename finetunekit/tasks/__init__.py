"""Tasks: each owns its head size, loss, metrics and prediction format, so the loop stays the same."""

from .classification import Classification

__all__ = ["Classification"]
