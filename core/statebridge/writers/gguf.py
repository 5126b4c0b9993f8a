"""Placeholder (being written)."""
from .base import Writer


class GGUFWriter(Writer):
    format = "gguf"
