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
import re
import warnings
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
        try:
            with open(self.path, "rb") as f:
                magic = f.read(2)
            is_zip = zipfile.is_zipfile(self.path)
        except OSError as e:
            raise SourceError(self.path, f"cannot read: {e.strerror or e}") from None
        # Recognise the two formats torch.save writes before handing bytes to the unpickler.
        if not magic:
            raise SourceError(self.path, "file is empty, not a torch checkpoint")
        if magic == b"PK" and not is_zip:
            raise SourceError(self.path, "zip archive is incomplete (no central directory): truncated or corrupt torch checkpoint")
        if not is_zip and magic[:1] != b"\x80":
            raise SourceError(
                self.path,
                f"not a torch checkpoint: starts with bytes {magic.hex(' ')}, not a zip archive (torch.save) "
                "or a pickle (legacy torch.save); wrong file?",
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
                # only the zip format can be memory-mapped
                return torch.load(self.path, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as e:
            raise SourceError(self.path, _unpickling_message(str(e))) from None
        except Exception as e:  # torch raises RuntimeError, EOFError, ValueError, IndexError... for broken files
            message = _first_sentence(str(e)) or type(e).__name__
            if "magic number" in message.lower():
                message = "it is a pickle, but not one written by torch.save"
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


_REFUSAL = (
    "refused to unpickle: {what}; statebridge loads only tensors and plain containers from "
    "pickles and never runs code from a checkpoint (save the state_dict() rather than objects)"
)


def _unpickling_message(text: str) -> str:
    """Turn torch's long ``weights_only`` refusal into one line saying what was refused."""
    found = re.search(r"GLOBAL ([\w.]+?)\.?(?:\s|$)", text)
    if found:
        return _REFUSAL.format(what=f"it needs {found.group(1)}, which could run code")
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        code = int(found.group(1))
        return (
            f"cannot unpickle safely: pickle opcode {code} (0x{code:02x}) is not one torch.save writes "
            "(written by pickle.dump rather than torch.save, or corrupt?); statebridge never runs code from a checkpoint"
        )
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    return _REFUSAL.format(what=lines[0] if lines else "it holds objects other than tensors")


def _first_sentence(text: str) -> str:
    """The first line of an error message, cut to its first sentence when long."""
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(line) > 160 and ". " in line:
        line = line.split(". ", 1)[0]
    return line


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], skipped: list[str]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, skipped)
    else:
        skipped.append(prefix or "<root>")
