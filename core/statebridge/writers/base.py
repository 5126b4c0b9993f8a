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

from ..errors import ConfigError, ExecutionError
from ..tensors.provenance import is_reserved
from ..readers.base import RawSpan, Source
from ..tensors.meta import TensorMeta
from ..tensors.patterns import key_problem

if TYPE_CHECKING:
    import torch

    from ..planning.plan import Plan
    from ..transforms.compose import Lineage


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
    #: whether the format stores block-quantized types, so carried quantized tensors keep theirs (GGUF)
    stores_quantized: ClassVar[bool] = False

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
        #: how each output tensor was made (set by ``run``), so that a refusal can name the step
        self.lineage: Mapping[str, Lineage] = {}
        #: the name stem of a folder target's files (``model`` gives ``model.safetensors``); a PEFT
        #: adapter folder's is ``adapter_model``, which ``run`` sets so that PEFT finds the weights
        self.stem = "model"
        #: sub-folders of the source model folder a folder target carries unchanged (``tokenizer`` for a
        #: ``.tprog``), set in ``__init__`` or by :meth:`fit`; the core carries none of its own accord,
        #: since what a sub-folder holds (optimizer state, caches) may not fit the new tensors
        self.folders: tuple[str, ...] = ()

    @property
    def writes_folder(self) -> bool:
        """Whether the target is a folder (shards and an index) rather than one file."""
        return False

    @classmethod
    def for_target(cls, target: Path) -> bool:
        """Whether this writer is the natural choice for ``target`` (used when no format is named)."""
        return False

    def fit(self, plan: Plan) -> None:
        """Adjust to ``plan`` before anything is written, or refuse it with a one-line :class:`ConfigError`.

        Called once the writer is made for a run (and for a dry run's estimate), before the
        model folder's companions are fitted to it: a format that needs a file the source
        lacks says so here, and one that carries sub-folders picks them (:attr:`folders`)
        from what the plan does.  The default accepts every plan.
        """

    def carry(self, source: Source) -> None:
        """Keep ``source``'s own metadata in the output, under this run's (``metadata`` wins on a clash).

        Metadata is carried only between files of one format (``source.format ==
        self.format``): what one format stores means nothing to another.  Keys under
        ``statebridge.`` are not carried: the run writes its own provenance there.
        """
        if source.format == self.format:
            carried = {k: v for k, v in source.metadata.items() if not is_reserved(k)}
            self.metadata = {**carried, **self.metadata}

    def check(self, metas: Mapping[str, TensorMeta]) -> None:
        """Refuse what this format cannot store with a :class:`ConfigError` naming the key (see :meth:`refuse`).

        Called by :meth:`layout` and :meth:`begin`, so a dry run finds what a run would
        refuse.  The base refuses names that are not text; formats add their own limits.
        """
        for key in metas:
            problem = key_problem(key)
            if problem:
                raise self.refuse(key, problem)

    def refuse(self, key: str, reason: str) -> ConfigError:
        """The error for a tensor this format cannot store: its name, the step that made it, why."""
        lineage = self.lineage.get(key)
        made = ""
        if lineage is not None and lineage.ops:
            sources = ", ".join(repr(s) for s in lineage.sources[:3]) + (", ..." if len(lineage.sources) > 3 else "")
            made = f" (made by {' -> '.join(lineage.ops)}" + (f" from {sources})" if sources else ")")
        return ConfigError(f"cannot write {key!r}{made} to {self.format}: {reason}")

    def layout(self, metas: Mapping[str, TensorMeta]) -> list[PlannedFile]:
        """The files :meth:`begin` would write for ``metas``, from metadata alone (shown by dry runs).

        The default is one file holding every tensor; writers that shard override it.
        """
        self.check(metas)
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
