"""Streaming safetensors writer: one file, or HF-style shards with ``model.safetensors.index.json``.

Every header is computed from the plan before any data arrives, so each file is
created at its final size with its header in place and every tensor is written
straight to its own offset with positional writes: a shard is never held in
memory, arrival order does not matter, and several threads or processes (the
ranks of a distributed run, see :meth:`SafetensorsWriter.join`) can fill one
file at once.  Unchanged tensors are copied from the source file by the kernel
(``copy_file_range``) without being decoded.  Every 64 MB written to a file,
the kernel is asked to start writing it back, so the disk works during the
copy instead of all at the final fsync.

``__metadata__`` holds ``format: pt``, then the source's own ``__metadata__``
when the source is safetensors (less the index's ``total_size``, which this
writer computes), then the run's ``metadata`` and provenance.  A tensor may not
be named ``__metadata__``: the format keeps that name for the metadata.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ExecutionError
from ..readers.base import RawSpan, Source
from ..tensors.meta import TensorMeta, dtype_name
from .base import PlannedFile, Writer
from .rawcopy import copy_spans, start_writeback, tensor_bytes, write_at

if TYPE_CHECKING:
    import torch

DEFAULT_SHARD_SIZE = 5 * 1024**3
#: start writing back a file's dirty pages after this many bytes (see :func:`start_writeback`)
WRITEBACK_EVERY = 64 * 1024**2
_CLEAN = (2**63, 0, 0)  # nothing written since the last writeback
PAGE = mmap.PAGESIZE


class SafetensorsWriter(Writer):
    """Writes ``*.safetensors`` targets as one file, and folder targets as shards plus index."""

    format = "safetensors"
    shareable = True

    def __init__(self, path: Path, *, metadata: Mapping[str, str] | None = None, shard_size: int | None = None) -> None:
        super().__init__(path, metadata=metadata, shard_size=shard_size)
        self.single_file = self.path.suffix == ".safetensors"
        self._files: list[tuple[Path, dict[str, tuple[int, int]]]] = []
        self._where: dict[str, tuple[int, int]] = {}  # key -> (file index, absolute offset)
        self._fds: list[int] = []
        self._dirty: list[tuple[int, int, int]] = []  # per file: (first, end, bytes) written since the last writeback
        self._joined = False

    @property
    def writes_folder(self) -> bool:
        return not self.single_file

    @classmethod
    def for_target(cls, target: Path) -> bool:
        return target.suffix == ".safetensors" or target.suffix == ""

    def carry(self, source: Source) -> None:
        given = self.metadata
        super().carry(source)
        if "total_size" not in given:  # the source index's bookkeeping, not the model's: _index writes ours
            self.metadata.pop("total_size", None)

    def check(self, metas: Mapping[str, TensorMeta]) -> None:
        super().check(metas)
        for key, meta in metas.items():
            if key == "__metadata__":
                raise self.refuse(key, "safetensors keeps that name for the file's metadata; rename the tensor")
            if meta.dtype.code is None:
                raise self.refuse(key, f"safetensors cannot store dtype {dtype_name(meta.dtype)}")

    def begin(self, metas: Mapping[str, TensorMeta]) -> None:
        for path, header, size in self._lay_out(metas):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            self._dirty.append(_CLEAN)
            try:
                write_at(fd, len(header).to_bytes(8, "little") + header, 0)
                os.ftruncate(fd, size)  # the data section starts as a hole the tensors fill in
            except OSError as e:
                raise ExecutionError(f"{path}: cannot lay out the file: {e.strerror or e}") from None

    def join(self, metas: Mapping[str, TensorMeta]) -> None:
        self._joined = True
        for path, _, size in self._lay_out(metas):
            try:
                fd = os.open(path, os.O_WRONLY)
            except OSError as e:
                raise ExecutionError(f"{path}: cannot open the file rank 0 laid out: {e.strerror or e}") from None
            self._fds.append(fd)
            self._dirty.append(_CLEAN)
            if os.fstat(fd).st_size != size:
                raise ExecutionError(f"{path}: rank 0 laid it out with another size; do all ranks run the same plan?")

    def layout(self, metas: Mapping[str, TensorMeta]) -> list[PlannedFile]:
        headers = self._headers(metas)
        files = [PlannedFile(name, list(spans), 8 + len(header) + size) for name, header, spans, size in headers]
        if not self.single_file and len(files) > 1:
            index = self._index([(name, spans) for name, _, spans, _ in headers])
            files.append(PlannedFile(self._index_name, [], len(index.encode())))
        return files

    def _lay_out(self, metas: Mapping[str, TensorMeta]) -> list[tuple[Path, bytes, int]]:
        """Every file's path, encoded header and total size; records where each tensor goes."""
        files = []
        for index, (name, header, spans, size) in enumerate(self._headers(metas)):
            path = self.path if self.single_file else self.path / name
            data_start = 8 + len(header)
            for key, (begin, _) in spans.items():
                self._where[key] = (index, data_start + begin)
            self._files.append((path, spans))
            files.append((path, header, data_start + size))
        return files

    def _headers(self, metas: Mapping[str, TensorMeta]) -> list[tuple[str, bytes, dict[str, tuple[int, int]], int]]:
        """Each file's name, encoded header, tensor spans (within the data section) and data size."""
        self.check(metas)
        shards = self._shards(metas)
        metadata = {"format": "pt", **self.metadata}
        files = []
        for name, keys in zip(self._names(len(shards)), shards):
            header: dict[str, object] = {"__metadata__": metadata}
            offset = 0
            spans = {}
            for key in keys:
                meta = metas[key]
                header[key] = {"dtype": meta.dtype.code, "shape": list(meta.shape), "data_offsets": [offset, offset + meta.nbytes]}
                spans[key] = (offset, offset + meta.nbytes)
                offset += meta.nbytes
            encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
            encoded += b" " * self._padding(len(encoded), spans)
            files.append((name, encoded, spans, offset))
        return files

    def _padding(self, length: int, spans: Mapping[str, tuple[int, int]]) -> int:
        """Spaces after a header of ``length`` bytes: to 8 bytes, and, where a tensor of this file will
        be copied as raw bytes, so far that it lies at the same offset within a page as in its source.

        The kernel then copies whole pages: a rename-only conversion ran about 10 % faster so
        (0.92 s against 1.02 s for 2.46 GB here).  Every tensor after it in the same order as in
        the source (a rename keeps them so) is aligned too.  At most a page of spaces.
        """
        for key, (begin, _) in spans.items():
            source = self.source_offsets.get(key)
            if source is not None:
                pad = (source - begin - 8 - length) % PAGE
                if (8 + length + pad) % 8 == 0:
                    return pad
                break
        return -length % 8

    def _index(self, files: list[tuple[str, dict[str, tuple[int, int]]]]) -> str:
        """The text of ``model.safetensors.index.json`` for these files and their tensors' spans."""
        weight_map = {key: name for name, spans in files for key in spans}
        total = sum(end - begin for _, spans in files for begin, end in spans.values())
        return json.dumps({"metadata": {"total_size": total, **self.metadata}, "weight_map": weight_map}, indent=2) + "\n"

    def _shards(self, metas: Mapping[str, TensorMeta]) -> list[list[str]]:
        if self.single_file:
            return [list(metas)]
        limit = self.shard_size or DEFAULT_SHARD_SIZE
        shards: list[list[str]] = [[]]
        size = 0
        for key, meta in metas.items():
            if shards[-1] and size + meta.nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(key)
            size += meta.nbytes
        return shards

    def _names(self, count: int) -> list[str]:
        if self.single_file:
            return [self.path.name]
        if count == 1:
            return [f"{self.stem}.safetensors"]
        return [f"{self.stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]

    @property
    def _index_name(self) -> str:
        return f"{self.stem}.safetensors.index.json"  # model.safetensors.index.json, as transformers names it

    def write(self, key: str, tensor: torch.Tensor) -> None:
        index, offset = self._where[key]
        try:
            write_at(self._fds[index], tensor_bytes(tensor), offset)
        except OSError as e:
            raise ExecutionError(f"{self._files[index][0]}: cannot write {key!r}: {e.strerror or e}") from None
        self._wrote(index, offset, tensor.nbytes)

    def write_raw(self, key: str, spans: Sequence[RawSpan]) -> bool:
        index, offset = self._where[key]
        try:
            copied = copy_spans(spans, self._fds[index], offset)
        except OSError as e:
            raise ExecutionError(
                f"{self._files[index][0]}: cannot copy {key!r} from {spans[0].path}: {e.strerror or e}"
            ) from None
        self._wrote(index, offset, copied)
        return True

    def _wrote(self, index: int, offset: int, nbytes: int) -> None:
        """Count bytes written at ``offset``; start writing back each 64 MB stretch (durable runs only)."""
        if not self.durable:
            return
        begin, end, dirty = self._dirty[index]
        begin, end, dirty = min(begin, offset), max(end, offset + nbytes), dirty + nbytes
        if dirty >= WRITEBACK_EVERY:
            start_writeback(self._fds[index], begin, end - begin)
            begin, end, dirty = _CLEAN
        self._dirty[index] = (begin, end, dirty)

    def finish(self) -> list[Path]:
        fds, self._fds = self._fds, []
        for fd in fds:
            self.sync(fd)
            os.close(fd)
        files = [path for path, _ in self._files]
        if not self.single_file and len(files) > 1:
            index_path = self.path / self._index_name
            if not self._joined:
                index_path.write_text(self._index([(path.name, spans) for path, spans in self._files]))
            files.append(index_path)
        return files

    def abort(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
