"""Torch pickles (``torch.save`` files) read with ``weights_only=True``.

Only tensors, containers and primitive values can be unpickled, so a file that
tries to run code fails with :class:`~statebridge.errors.SourceError` before any
of its code runs.  Zip-format files are memory-mapped: tensors are read from
disk only when used.  Nested dicts (``{"model": {...}, "epoch": 3}``) are
flattened to dotted keys; values that are not tensors are skipped and listed
in :attr:`TorchPickle.skipped`.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import SourceError
from ..meta import TensorMeta
from .base import Source

TORCH_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}


class TorchPickle(Source):
    """A ``torch.save`` checkpoint."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.skipped: list[str] = []
        self._tensors: dict[str, torch.Tensor] = {}
        _flatten(self._load(), "", self._tensors, self.skipped)
        self._metas = {k: TensorMeta.of(v) for k, v in self._tensors.items()}

    def _load(self) -> Any:
        if not self.path.is_file():
            raise SourceError(self.path, "no such file")
        mmap = zipfile.is_zipfile(self.path)  # only the zip format can be memory-mapped
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(
                self.path,
                "refused to unpickle: the file holds objects other than tensors and plain containers, "
                f"and statebridge never runs code from a checkpoint ({first_line})",
            ) from None
        except Exception as e:  # torch raises RuntimeError, EOFError, ValueError... for broken files
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(self.path, f"not a readable torch checkpoint (truncated or corrupt?): {message}") from None

    def metas(self) -> Mapping[str, TensorMeta]:
        return self._metas

    def load(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise SourceError(self.path, f"no tensor named {key!r}") from None

    def close(self) -> None:
        self._tensors = {}


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], skipped: list[str]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, skipped)
    else:
        skipped.append(prefix or "<root>")
