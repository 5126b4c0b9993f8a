"""The writer interface every output format implements.

A writer is told every target tensor's metadata before the first byte is
written (the plan knows them from headers), so it can lay out files and write
headers up front, then receive tensors one at a time in plan order.  It writes
into a staging path that the caller's transaction renames into place on success.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..errors import ExecutionError
from ..readers.base import RawSpan
from ..tensors.meta import TensorMeta

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PlannedFile:
    """A file a writer will write, known from the plan before any data: for dry runs."""

    name: str  # relative to the target folder, or the target file's own name
    keys: list[str]  # the tensors it will hold, in order
    nbytes: int  # its size in bytes, or the tensors' bytes where the format's overhead is not known yet


class Writer(ABC):
    """Streams a plan's output tensors into one target format."""

    #: the format name users give as ``format:`` / ``--format``
    format: ClassVar[str]
    #: whether the ranks of a distributed run can write one target together (see :meth:`join`)
    shareable: ClassVar[bool] = False

    def __init__(self, path: Path, *, metadata: Mapping[str, str] | None = None, shard_size: int | None = None) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self.shard_size = shard_size
        #: whether :meth:`finish` makes the files durable (fsync); ``run(durable=False)`` clears it
        self.durable = True
        #: where each tensor that will be copied as raw bytes starts in its source file (set by
        #: ``run`` before :meth:`begin`): a writer that places tensors may align to it, so the
        #: kernel copies whole pages
        self.source_offsets: Mapping[str, int] = {}
        #: the name stem of a folder target's files (``model`` gives ``model.safetensors``); a PEFT
        #: adapter folder's is ``adapter_model``, which ``run`` sets so that PEFT finds the weights
        self.stem = "model"

    @property
    def writes_folder(self) -> bool:
        """Whether the target is a folder (shards and an index) rather than one file."""
        return False

    @classmethod
    def for_target(cls, target: Path) -> bool:
        """Whether this writer is the natural choice for ``target`` (used when no format is named)."""
        return False

    def layout(self, metas: Mapping[str, TensorMeta]) -> list[PlannedFile]:
        """The files :meth:`begin` would write for ``metas``, from metadata alone (shown by dry runs).

        The default is one file holding every tensor; writers that shard override it.
        """
        return [PlannedFile(self.path.name, list(metas), sum(m.nbytes for m in metas.values()))]

    @abstractmethod
    def begin(self, metas: Mapping[str, TensorMeta]) -> None:
        """Receive every output tensor's metadata, in the order tensors will arrive."""

    @abstractmethod
    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write one tensor (its shape and dtype match what :meth:`begin` announced)."""

    def write_raw(self, key: str, spans: Sequence[RawSpan]) -> bool:
        """Copy a tensor's bytes straight from source files (``spans``, laid end to end); False if unsupported.

        Raw copies may arrive before :meth:`write` calls for keys announced
        earlier (the executor copies them while it computes other groups), so a
        writer that supports them must place each tensor at its own offset.
        """
        return False

    def join(self, metas: Mapping[str, TensorMeta]) -> None:
        """Open the target another process laid out with :meth:`begin`, to write some of its tensors.

        Used by the ranks of a distributed run other than rank 0, after rank 0's
        :meth:`begin`.  Only writers with ``shareable = True`` implement it; their
        :meth:`finish` then closes this process's part and leaves indexes to rank 0.
        """
        raise NotImplementedError(f"the {self.format} writer cannot be shared between processes")

    def announced(self, key: str, metas: Mapping[str, TensorMeta], written: Collection[str], started: bool) -> TensorMeta:
        """The metadata :meth:`begin` announced for ``key``; an error for a write out of protocol."""
        if not started:
            raise ExecutionError(f"{self.path}: write({key!r}) before begin()")
        meta = metas.get(key)
        if meta is None:
            raise ExecutionError(f"{self.path}: {key!r} was not announced to begin()")
        if key in written:
            raise ExecutionError(f"{self.path}: {key!r} was written twice")
        return meta

    @abstractmethod
    def finish(self) -> list[Path]:
        """Flush, :meth:`sync` and close; return the files written."""

    def sync(self, fd: int) -> None:
        """fsync a written file, unless the run asked for no durability (``durable=False``)."""
        if self.durable:
            os.fsync(fd)

    def abort(self) -> None:
        """Close open handles after a failure (the transaction removes the files)."""
