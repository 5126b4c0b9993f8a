"""Open any supported checkpoint lazily: :func:`open_source` picks the reader."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Union

from ..errors import SourceError
from .base import TORCH_SUFFIXES, RawSpan, Source, open_regular
from .memory import DictSource, ModuleSource, is_module
from .safetensors import INDEX_NAME, SafetensorsFile, ShardedSafetensors

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "DictSource",
    "ModuleSource",
    "RawSpan",
    "SafetensorsFile",
    "ShardedSafetensors",
    "Source",
    "TorchPickle",
    "open_source",
]

SourceLike = Union[Source, str, "os.PathLike[str]", Mapping[str, "torch.Tensor"], "nn.Module"]


def open_source(source: SourceLike) -> Source:
    """Open a checkpoint lazily from a path, a state dict or a module.

    Paths may be a ``.safetensors`` file, a sharded folder (with or without
    ``model.safetensors.index.json``), the index file itself, a torch pickle
    (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) or a ``.gguf`` file (the first part of a split GGUF, or a
    folder of just its parts, opens every part).  Anything
    else is recognised by its first bytes.  Only regular files (and links to them) are read:
    a FIFO, a socket or a device is refused with a :class:`~statebridge.errors.SourceError`.
    """
    if isinstance(source, Source):
        return source
    if is_module(source):
        return ModuleSource(source)
    if isinstance(source, Mapping):
        return DictSource(source)
    path = Path(source)
    if not path.exists():
        raise SourceError(path, "no such file or folder")
    if path.is_dir():
        if (path / INDEX_NAME).is_file() or any(path.glob("*.safetensors")):
            return ShardedSafetensors(path)
        ggufs = sorted(path.glob("*.gguf"))
        torches = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES)
        if ggufs and not torches and (len(ggufs) == 1 or _split_set(ggufs)):
            return _gguf(ggufs[0])
        if len(torches) == 1 and not ggufs:
            return _torch(torches[0])
        candidates = [p.name for p in ggufs + torches]
        if candidates:
            raise SourceError(
                path, f"found {len(candidates)} checkpoints here ({', '.join(candidates)}); name the one to read"
            )
        raise SourceError(
            path,
            "found no checkpoint here (expected *.safetensors, a model.safetensors.index.json, one .gguf "
            f"or one torch file: {', '.join(sorted(TORCH_SUFFIXES))})",
        )
    if path.name.endswith(".index.json"):
        return ShardedSafetensors(path.parent, index=path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsFile(path)
    if suffix == ".gguf":
        return _gguf(path)
    if suffix in TORCH_SUFFIXES:
        return _torch(path)
    with open_regular(path) as f:  # a FIFO or a device is refused here, before a read could block
        try:
            magic = f.read(9)
        except OSError as e:
            raise SourceError(path, f"cannot read: {e.strerror or e}") from None
    kind = sniff(magic)
    if kind == "gguf":
        return _gguf(path)
    return _torch(path) if kind == "torch" else SafetensorsFile(path)


def sniff(head: bytes) -> str:
    """The format a file's first 9 bytes suggest: ``gguf``, ``torch`` (a zip or a pickle) or ``safetensors``.

    safetensors starts with its header's length (8 bytes, little-endian) and then ``{``, so
    its first byte may be 0x80, a pickle's first byte, too: the ``{`` decides.
    """
    if head[:4] == b"GGUF":
        return "gguf"
    if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):
        return "torch"
    return "safetensors"


def _torch(path: Path) -> Source:
    """The torch pickle reader, imported only for torch files (zipfile and pickle are not free to import)."""
    from .torch_pickle import TorchPickle

    return TorchPickle(path)


def __getattr__(name: str) -> type:
    """``TorchPickle`` and ``GGUFSource``, imported on first use (start-up stays fast for the other formats)."""
    if name == "TorchPickle":
        from .torch_pickle import TorchPickle

        return TorchPickle
    if name == "GGUFSource":
        from .gguf import GGUFSource

        return GGUFSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _gguf(path: Path) -> Source:
    """The GGUF reader, imported only for GGUF files (the ``gguf`` library brings numpy, a tenth of a second)."""
    from .gguf import open_gguf

    return open_gguf(path)  # the whole model when ``path`` is the first part of a split GGUF


def _split_set(ggufs: list[Path]) -> bool:
    """Whether these files (sorted) are exactly the parts of one split GGUF, as ``gguf-split`` names them."""
    from .gguf import split_names, split_path

    first = split_names(ggufs[0])
    return first is not None and ggufs == [split_path(first[0], i, first[1]) for i in range(first[1])]
