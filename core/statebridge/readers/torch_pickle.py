"""Torch pickles (``torch.save`` files) read with ``weights_only=True``.

Only tensors, containers and primitive values can be unpickled, so a file that
tries to run code fails with :class:`~statebridge.errors.SourceError` before any
of its code runs.  Zip-format files are memory-mapped: tensors are read from
disk only when used.

Every tensor the file holds is a tensor of the state, under a dotted key: nested
dicts give their keys (``{"model": {"w": t}}`` is ``model.w``), lists and tuples
their indices, as ``nn.ModuleList`` state dicts do (``{"layers": [t0, t1]}`` is
``layers.0`` and ``layers.1``).  Values that are not tensors (``epoch: 3``, a
config dict of numbers) are not part of the state: each largest part of the file
that holds no tensor is listed once in :attr:`TorchPickle.skipped`.  A tensor
that cannot be read as plain dense data (sparse, quantized, nested, meta), or
one in a set (which has no order to name it by), is refused, naming the file
and the key.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SourceError
from ..tensors.meta import TensorMeta
from .base import TORCH_SUFFIXES, Source, check_key, open_regular, unreadable

if TYPE_CHECKING:
    import torch



class TorchPickle(Source):
    """A ``torch.save`` checkpoint."""

    format = "torch"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.skipped: list[str] = []
        self._tensors: dict[str, torch.Tensor] = {}
        _flatten(self._load(), self.path, self._tensors, self.skipped)
        self._metas = {k: TensorMeta.of(v) for k, v in self._tensors.items()}

    def _load(self) -> Any:
        import torch

        try:
            with open_regular(self.path) as f:
                head = f.read(4)
                size = os.fstat(f.fileno()).st_size
            magic = head[:2]
            # as torch.load does: a zip starts with a local file header (zipfile looks at the end record only)
            is_zip = head == b"PK\x03\x04" and zipfile.is_zipfile(self.path)
        except OSError as e:
            raise SourceError(self.path, f"cannot read: {e.strerror or e}") from None
        except zipfile.BadZipFile as e:  # is_zipfile raises on some damaged end records
            raise SourceError(self.path, f"zip archive is damaged ({e}): corrupt torch checkpoint") from None
        # Recognise the two formats torch.save writes before handing bytes to the unpickler.
        if not magic:
            raise SourceError(self.path, "file is empty, not a torch checkpoint")
        if magic == b"PK" and head != b"PK\x03\x04":
            raise SourceError(self.path, "zip archive is damaged: it does not start with a zip entry (corrupt torch checkpoint)")
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
                if is_zip:  # only the zip format can be memory-mapped
                    return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                # The legacy format is unpickled straight from the file: see _BoundedReader.
                with open_regular(self.path, buffering=0) as raw, _BoundedReader(raw, size) as f:
                    return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise SourceError(self.path, _unpickling_message(str(e))) from None
        except Exception as e:  # torch raises RuntimeError, EOFError, ValueError, IndexError... for broken files
            message = _first_sentence(str(e)) or type(e).__name__
            # torch leaves some of its printf placeholders unfilled ("expected %ld got %ld48"): cut them off
            message = re.sub(r"[:,]?\s*(?:expected\s+)?%l?[du].*$", "", message) or type(e).__name__
            if "magic number" in message.lower():
                message = "it is a pickle, but not one written by torch.save"
            elif isinstance(e, (LookupError, AttributeError, TypeError, AssertionError, struct.error)):
                message = f"its pickle is malformed ({type(e).__name__}: {message[:200]})"  # bare "6" says nothing
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


class _BoundedReader(io.BufferedReader):
    """A file whose ``read(n)`` refuses an ``n`` larger than what is left.

    A pickle's string and bytes opcodes carry their length, and the unpickler asks the
    file for that many bytes at once: a buffered file allocates the whole claimed
    length (up to 2**64 bytes) before finding the file is shorter.
    """

    def __init__(self, raw: io.RawIOBase, size: int) -> None:
        super().__init__(raw)
        self._size = size

    def read(self, n: int | None = -1) -> bytes:
        if n is not None and n > 1 << 20 and n > self._size - self.tell():
            raise EOFError(f"a length in the pickle claims {n} bytes, but only {self._size - self.tell()} are left")
        return super().read(n)


_REFUSAL = (
    "refused to unpickle: {what}; statebridge loads only tensors and plain containers from "
    "pickles and never runs code from a checkpoint (save the state_dict() rather than objects)"
)


def _unpickling_message(text: str) -> str:
    """Turn torch's long ``weights_only`` refusal into one line saying what was refused."""
    found = re.search(r"GLOBAL (\S+?)\.?(?:\s|$)", text)
    if found:
        return _REFUSAL.format(what=f"it needs {found.group(1)}, which could run code")
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        code = int(found.group(1))
        return (
            f"cannot unpickle safely: pickle opcode {code} (0x{code:02x}) is not one torch.save writes "
            "(written by pickle.dump rather than torch.save, or corrupt?); statebridge never runs code from a checkpoint"
        )
    found = re.search(r"WeightsUnpickler error:[ \t]*(\S[^\n]*)", text)
    if found:
        return _REFUSAL.format(what=found.group(1).strip()[:300])
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1) ", "(2) ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    return _REFUSAL.format(what=lines[0][:300] if lines else "it holds objects other than tensors")


def _first_sentence(text: str) -> str:
    """The first line of an error message, cut to its first sentence when long."""
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(line) > 160 and ". " in line:
        line = line.split(". ", 1)[0]
    return line


#: containers nested deeper than this are refused (checkpoints nest a few levels)
MAX_NESTING = 100


def _flatten(root: Any, path: Path, out: dict[str, torch.Tensor], skipped: list[str]) -> None:
    """Name every tensor in ``root`` by its dotted path of dict keys and list indices; list the rest.

    A pickle can refer to one object from many places (its memo), so a container may
    contain itself, and a few hundred bytes can describe 2**60 paths through a few dozen
    containers: walking stops once it has made far more visits than there are distinct objects.
    """
    import torch

    distinct: set[int] = set()
    visits = 0

    def shown(prefix: str) -> str:
        return repr(prefix) if len(prefix) <= 120 else f"{prefix[:100]!r}... ({len(prefix)} characters)"

    def visit(obj: Any, prefix: str, parents: tuple[int, ...]) -> tuple[bool, list[str]]:
        """Walk ``obj``: whether it holds a tensor, and its parts that are skipped (in file order).

        A part holding no tensor is skipped whole by its parent; at the top, each such part is named.
        """
        nonlocal visits
        visits += 1
        distinct.add(id(obj))
        if visits > 10_000 + 16 * len(distinct):
            raise SourceError(
                path,
                f"its containers refer to the same containers over and over ({visits}+ paths through "
                f"{len(distinct)} objects); corrupt or malicious pickle",
            )
        if isinstance(obj, torch.Tensor):
            problem = unreadable(obj)
            if problem:
                raise SourceError(path, f"tensor {shown(prefix or '<root>')} {problem}")
            if prefix in out:
                raise SourceError(
                    path, f"two tensors flatten to the same key {shown(prefix)} (as 'a.b' and 'b' inside 'a' would); which is meant?"
                )
            out[check_key(path, prefix)] = obj
            return True, []
        if isinstance(obj, Mapping):
            items: list[tuple[Any, Any]] = list(obj.items())
        elif isinstance(obj, (list, tuple)):
            items = list(enumerate(obj))
        elif isinstance(obj, (set, frozenset)):
            if any(isinstance(item, torch.Tensor) for item in obj):
                raise SourceError(path, f"the set at {shown(prefix or '<root>')} holds tensors, which have no names in a set")
            return False, []
        else:
            return False, []
        if id(obj) in parents:
            # never at the root: a container is found inside itself one level down, at least
            raise SourceError(path, f"the {type(obj).__name__} at {shown(prefix)} contains itself; not a state dict")
        if len(parents) >= MAX_NESTING:
            raise SourceError(path, f"containers nested more than {MAX_NESTING} deep (at {shown(prefix)}); not a state dict")
        found, parts = False, []
        for key, value in items:
            child = f"{prefix}.{key}" if prefix else str(key)
            child_found, child_parts = visit(value, child, (*parents, id(obj)))
            found = found or child_found
            parts.extend(child_parts if child_found else [child])
        return found, parts

    found, parts = visit(root, "", ())
    skipped.extend(parts if parts or found else ["<root>"])
