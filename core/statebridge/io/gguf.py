"""GGUF reader (placeholder: being written)."""

from __future__ import annotations

from .base import Source


class GGUFSource(Source):
    def __init__(self, path):  # pragma: no cover - replaced by the real reader
        raise NotImplementedError
