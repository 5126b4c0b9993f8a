"""Streaming safetensors writer: one file, or HF-style shards with ``model.safetensors.index.json``.

Every header is computed from the plan before any data arrives, so tensors are
written straight to their final offsets (sequentially, in plan order) and a
shard is never held in memory.  Unchanged tensors are copied from the source
file by the kernel (``copy_file_range``) without being decoded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from ..io.base import RawSpan
from ..io.safetensors import INDEX_NAME
from ..errors import ConfigError
from ..meta import DTYPE_CODES, TensorMeta, dtype_name
from .base import Writer
from .rawcopy import copy_range

DEFAULT_SHARD_SIZE = 5 * 1024**3
SINGLE_FILE = "model.safetensors"


class SafetensorsWriter(Writer):
    """Writes ``*.safetensors`` targets as one file, and folder targets as shards plus index."""

    format = "safetensors"

    def __init__(self, path: Path, *, metadata: Mapping[str, str] | None = None, shard_size: int | None = None) -> None:
        super().__init__(path, metadata=metadata, shard_size=shard_size)
        self.single_file = self.path.suffix == ".safetensors"
        self._files: list[tuple[Path, dict[str, tuple[int, int]]]] = []
        self._where: dict[str, tuple[int, int]] = {}  # key -> (file index, absolute offset)
        self._handles: list[BinaryIO] = []

    @property
    def writes_folder(self) -> bool:
        return not self.single_file

    @classmethod
    def for_target(cls, target: Path) -> bool:
        return target.suffix == ".safetensors" or target.suffix == ""

    def begin(self, metas: Mapping[str, TensorMeta]) -> None:
        for key, meta in metas.items():
            if meta.dtype not in DTYPE_CODES:
                raise ConfigError(f"{key!r}: safetensors cannot store dtype {dtype_name(meta.dtype)}")
        shards = self._layout(metas)
        names = self._names(len(shards))
        metadata = {"format": "pt", **self.metadata}
        for index, (name, keys) in enumerate(zip(names, shards)):
            header: dict[str, object] = {"__metadata__": metadata}
            offset = 0
            spans = {}
            for key in keys:
                meta = metas[key]
                header[key] = {"dtype": DTYPE_CODES[meta.dtype], "shape": list(meta.shape), "data_offsets": [offset, offset + meta.nbytes]}
                spans[key] = (offset, offset + meta.nbytes)
                offset += meta.nbytes
            encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
            encoded += b" " * (-len(encoded) % 8)
            path = self.path if self.single_file else self.path / name
            handle = open(path, "wb")
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            handle.truncate(8 + len(encoded) + offset)
            data_start = 8 + len(encoded)
            for key, (begin, _) in spans.items():
                self._where[key] = (index, data_start + begin)
            self._files.append((path, spans))
            self._handles.append(handle)

    def _layout(self, metas: Mapping[str, TensorMeta]) -> list[list[str]]:
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
            return [SINGLE_FILE]
        return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        index, offset = self._where[key]
        handle = self._handles[index]
        if tensor.numel() == 0:
            return
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        if handle.tell() != offset:
            handle.seek(offset)
        handle.write(memoryview(data))

    def write_raw(self, key: str, span: RawSpan) -> bool:
        index, offset = self._where[key]
        handle = self._handles[index]
        handle.flush()
        copy_range(span.path, span.offset, handle, offset, span.length)
        handle.seek(offset + span.length)
        return True

    def finish(self) -> list[Path]:
        for handle in self._handles:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        files = [path for path, _ in self._files]
        if not self.single_file and len(files) > 1:
            weight_map = {key: path.name for path, spans in self._files for key in spans}
            total = sum(end - begin for _, spans in self._files for begin, end in spans.values())
            index = {"metadata": {"total_size": total, **self.metadata}, "weight_map": weight_map}
            index_path = self.path / INDEX_NAME
            index_path.write_text(json.dumps(index, indent=2) + "\n")
            files.append(index_path)
        return files

    def abort(self) -> None:
        for handle in self._handles:
            handle.close()
