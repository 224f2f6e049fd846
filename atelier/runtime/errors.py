"""What the runtime tells a request that it cannot serve it."""

from __future__ import annotations


class EngineClosed(RuntimeError):
    """The model was unloaded (evicted, unloaded by an operator, or the server is stopping)
    while the request waited or ran; it may be retried."""


class ModelTooLarge(RuntimeError):
    """The model's weights alone exceed ATELIER_MAX_MODEL_MEMORY."""


class WrongTask(ValueError):
    """The model does not do what the route asks (e.g. an image model asked for text)."""
