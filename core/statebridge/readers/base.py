"""The reader interface every checkpoint format implements.

A :class:`Source` knows its keys, shapes and dtypes from headers alone and reads
a tensor's bytes only when :meth:`Source.load` is called.  Keys are listed in
storage order, so reading them in that order walks each file front to back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..tensors.meta import TensorMeta

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RawSpan:
    """Where a tensor's bytes lie in a file, stored exactly as the target would store them.

    Writers use it to copy an unchanged tensor byte for byte without decoding it.
    """

    path: Path
    offset: int
    length: int


class Source(ABC):
    """A lazily opened checkpoint: metadata now, tensor data on demand."""

    #: what to call this source in messages (usually its path)
    name: str

    @abstractmethod
    def metas(self) -> Mapping[str, TensorMeta]:
        """Every tensor's shape and dtype, in storage order. Reads headers only."""

    @abstractmethod
    def load(self, key: str) -> torch.Tensor:
        """Read one tensor (CPU). Raises :class:`~statebridge.errors.SourceError` on bad data."""

    def raw_span(self, key: str) -> RawSpan | None:
        """The tensor's bytes in a file, when they are plain little-endian row-major data."""
        return None

    @property
    def metadata(self) -> Mapping[str, str]:
        """Free-form string metadata stored with the checkpoint (may be empty)."""
        return {}

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
