"""The reader interface every checkpoint format implements.

A :class:`Source` knows its keys, shapes and dtypes from headers alone and reads
a tensor's bytes only when :meth:`Source.load` is called.  Keys are listed in
storage order, so reading them in that order walks each file front to back.
"""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, ClassVar

from ..errors import SourceError
from ..tensors.meta import TensorMeta
from ..tensors.patterns import key_problem

if TYPE_CHECKING:
    import torch


#: file suffixes read as torch pickles (``torch.save`` zips or legacy pickles)
TORCH_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}


@dataclass(frozen=True)
class RawSpan:
    """Where a tensor's bytes lie in a file, stored exactly as the target would store them.

    Writers use it to copy an unchanged tensor byte for byte without decoding it.  A span
    whose ``path`` is None is ``length`` zero bytes (a tensor a step declares all zero,
    :meth:`statebridge.Group.zeros`): writers write them without a source file or torch.
    """

    path: Path | None
    offset: int
    length: int


@dataclass(frozen=True)
class FileIdentity:
    """Which file a path named at one moment: device, inode, size and modification time."""

    path: Path
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> "FileIdentity":
        try:
            info = os.stat(path)
        except OSError as e:
            raise SourceError(path, f"cannot look at it: {e.strerror or e}") from None
        return cls(Path(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


@dataclass(frozen=True)
class SourceIdentity:
    """The identity of every file a source reads, taken when it was opened; :meth:`check` it before committing.

    A file replaced by another of the same size (a new inode), or rewritten in place (a new
    modification time), would otherwise give a mix of old and new tensors.
    """

    files: tuple[FileIdentity, ...]

    def check(self) -> None:
        """Raise :class:`~statebridge.errors.SourceError` naming the first file that changed since."""
        for then in self.files:
            try:
                now = FileIdentity.of(then.path)
            except SourceError:
                raise SourceError(then.path, "was removed during the run; nothing was committed") from None
            if (now.device, now.inode) != (then.device, then.inode):
                change = "replaced by another file"
            elif now.size != then.size:
                change = f"resized from {then.size} to {now.size} bytes"
            elif now.mtime_ns != then.mtime_ns:
                change = "modified"
            else:
                continue
            raise SourceError(
                then.path, f"was {change} during the run, so the tensors read may mix two versions; nothing was committed"
            )

    def portable(self) -> list[tuple[str, int, int]]:
        """Path, size and modification time of each file: what processes on several machines can compare."""
        return [(os.path.realpath(f.path), f.size, f.mtime_ns) for f in self.files]


class Source(ABC):
    """A lazily opened checkpoint: metadata now, tensor data on demand."""

    #: what to call this source in messages (usually its path)
    name: str
    #: the file format, as writers name theirs (``"safetensors"``, ``"gguf"``, ...), or None for state
    #: in memory: a writer of the same format carries the source's :attr:`metadata` into its output
    format: ClassVar[str | None] = None
    #: values the file holds that are not tensors (a pickle's ``epoch``), so not part of the state
    skipped: Sequence[str] = ()

    @abstractmethod
    def metas(self) -> Mapping[str, TensorMeta]:
        """Every tensor's shape and dtype, in storage order. Reads headers only."""

    @abstractmethod
    def load(self, key: str) -> torch.Tensor:
        """Read one tensor (CPU). Raises :class:`~statebridge.errors.SourceError` on bad data."""

    def raw_span(self, key: str) -> RawSpan | None:
        """The tensor's bytes in a file, when they are plain little-endian row-major data."""
        return None

    def stored_span(self, key: str) -> RawSpan | None:
        """The tensor's bytes in a file as stored, for a tensor whose meta names a ``stored`` (quantized) type."""
        return None

    @property
    def metadata(self) -> Mapping[str, str]:
        """Free-form string metadata stored with the checkpoint (may be empty)."""
        return {}

    def files(self) -> list[Path]:
        """The files the tensors are read from: the target policy keeps runs from writing over them.

        By default the one file a reader keeps in a ``path`` attribute (none for in-memory
        sources); readers of several files override it.
        """
        path = getattr(self, "path", None)
        return [Path(path)] if isinstance(path, (str, os.PathLike)) else []

    def identity(self) -> SourceIdentity:
        """The identity of :meth:`files` now; a run takes it when it opens the source and checks it before committing."""
        return SourceIdentity(tuple(FileIdentity.of(path) for path in self.files()))

    def close(self) -> None:
        """Release file handles and maps."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.metas())

    def __len__(self) -> int:
        return len(self.metas())

    def __contains__(self, key: object) -> bool:
        return key in self.metas()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {len(self)} tensors>"


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def open_regular(path: str | os.PathLike[str], buffering: int = -1) -> BinaryIO:
    """Open ``path`` for reading; refuse anything but a regular file (or a link to one).

    Opening a FIFO for reading waits for a writer forever, and a device never ends:
    the file is opened without blocking and checked before a byte is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise SourceError(path, f"cannot read: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise SourceError(path, f"is {kind}, not a checkpoint file; statebridge reads checkpoints from regular files")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb", buffering=buffering)


def check_key(path: str | os.PathLike[str], key: object) -> str:
    """``key`` if it can name a tensor; else a :class:`SourceError` naming the file and the key."""
    problem = key_problem(key)
    if problem:
        text = repr(key)  # a lying header can hold a name megabytes long
        raise SourceError(path, f"tensor name {text if len(text) <= 120 else text[:100] + '...'} {problem}")
    return key  # type: ignore[return-value]  # key_problem found it a str


def unreadable(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` has no plain dense data statebridge could read, or None when it has.

    Sparse, nested and quantized tensors store something other than their values
    element by element, and meta tensors store nothing.
    """
    import torch

    if tensor.is_nested:
        return "is a nested tensor; save each of its tensors on its own"
    if tensor.layout != torch.strided:
        return f"is sparse ({tensor.layout}); save tensor.to_dense() instead"
    if tensor.is_quantized:
        return f"is quantized ({tensor.dtype}); save tensor.dequantize() instead"
    if tensor.is_meta:
        return "is on the meta device and holds no data"
    return None
