"""Placeholder (being written)."""
from .base import Writer


class TorchWriter(Writer):
    format = "torch"
