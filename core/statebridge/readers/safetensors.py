"""Lazy safetensors readers: one file, or an HF-style sharded folder with an index.

The header is parsed and checked by hand (so a lying header is caught before
anything is allocated) and each loaded tensor is a view into its own private
copy-on-write memory map of its bytes: loading costs no copy, and a transform
that edits a tensor in place touches neither the file nor later loads.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import SourceError
from ..tensors.meta import SAFETENSORS_DTYPES, TensorMeta
from ..tensors.patterns import key_problem
from .base import RawSpan, Source, check_key, open_regular

if TYPE_CHECKING:
    import torch

#: refuse headers larger than this (the format's own reference implementation uses 100 MB)
MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"


class _Repeated:
    """A ``json.loads`` object hook that notes keys an object names twice (json keeps the last silently)."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def hook(self, pairs: list[tuple[str, object]]) -> dict[str, object]:
        obj = dict(pairs)
        if len(obj) < len(pairs) and not self.keys:
            seen: set[str] = set()
            self.keys.extend(k for k, _ in pairs if k in seen or seen.add(k))
        return obj


class _Checked(NamedTuple):
    """A header entry checked as it was parsed: its meta and where its bytes lie in the data section."""

    meta: TensorMeta
    begin: int
    end: int


_new_checked = tuple.__new__  # a _Checked without the named tuple's Python-level __new__


def _checked_entry(
    path: Path, brief: Callable[[object], str], mapping: Callable[[Any], dict[str, object]], key: str, info: object
) -> tuple[TensorMeta, int, int]:
    """A header entry's meta, begin and end, or the one-line error that says what is wrong with it."""
    if type(info) is not tuple:
        raise SourceError(path, f"tensor {brief(key)}: header entry is not an object")
    fields = mapping(info)
    code, shape = fields.get("dtype"), fields.get("shape")
    meta = _checked_meta(path, brief, key, code, shape)
    offsets = fields.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise SourceError(path, f"tensor {brief(key)}: data_offsets {brief(offsets)} are not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end - begin != meta.nbytes:
        raise SourceError(
            path, f"tensor {brief(key)}: data_offsets span {end - begin} bytes but {code}{brief(shape)} needs {meta.nbytes} bytes"
        )
    return meta, begin, end


def _checked_meta(path: Path, brief: Callable[[object], str], key: str, code: object, shape: object) -> TensorMeta:
    """The TensorMeta of a header entry's ``dtype`` and ``shape``, or the one-line error that says what is wrong."""
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise SourceError(
            path, f"tensor {brief(key)}: unknown dtype {brief(code)} (statebridge reads {', '.join(SAFETENSORS_DTYPES)})"
        )
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SourceError(path, f"tensor {brief(key)}: shape {brief(shape)} is not a list of non-negative integers")
    meta = _meta_for_torch(code, shape)
    if meta is None:
        raise SourceError(path, f"tensor {brief(key)}: shape {brief(shape)} is too large for torch (its sizes overflow int64)")
    return meta


def _meta_for_torch(code: str, shape: list[int]) -> TensorMeta | None:
    """The TensorMeta of a known dtype code and a list of non-negative integers; None if torch cannot hold it."""
    meta = TensorMeta(tuple(shape), SAFETENSORS_DTYPES[code])
    # torch computes sizes and strides in int64, even for a tensor with no elements
    extent = meta.dtype.itemsize
    for d in shape:
        extent *= max(d, 1)
        if extent >= 2**63:
            return None
    return meta


class SafetensorsFile(Source):
    """One ``.safetensors`` file."""

    format = "safetensors"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self._metas, self._offsets, self._metadata, self._data_start, self._size = _read_header(self.path)

    def metas(self) -> Mapping[str, TensorMeta]:
        return self._metas

    @property
    def metadata(self) -> Mapping[str, str]:
        return self._metadata

    def raw_span(self, key: str) -> RawSpan:
        try:
            begin = self._offsets[key]
        except KeyError:
            raise SourceError(self.path, f"no tensor named {key!r}") from None
        return RawSpan(self.path, self._data_start + begin, self._metas[key].nbytes)

    def load(self, key: str) -> torch.Tensor:
        import torch

        try:
            meta = self._metas[key]
        except KeyError:
            raise SourceError(self.path, f"no tensor named {key!r}") from None
        if meta.numel == 0:
            return torch.empty(meta.shape, dtype=meta.dtype.torch)
        span = self.raw_span(key)
        # Map just this tensor's pages (the map offset must be page aligned).  The tensor
        # keeps its map alive through the buffer and unmaps it when it is freed.
        start = span.offset - span.offset % mmap.ALLOCATIONGRANULARITY
        try:
            with open_regular(self.path) as f:
                size = os.fstat(f.fileno()).st_size
                # A file cut short after its header was checked would crash the process
                # (SIGBUS) when the missing pages are touched: refuse instead.
                if size != self._size:
                    raise SourceError(
                        self.path, f"file changed on disk since it was opened ({self._size} bytes then, {size} now); open it again"
                    )
                mapped = mmap.mmap(f.fileno(), span.offset + span.length - start, offset=start, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise SourceError(self.path, f"cannot map tensor {key!r}: {e.strerror or e}") from None
        tensor = torch.frombuffer(mapped, dtype=meta.dtype.torch, count=meta.numel, offset=span.offset - start)
        return tensor.reshape(meta.shape)


#: a JSON escape of a UTF-16 surrogate (``\ud800`` to ``\udfff``, either case)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _read_header(
    path: Path,
) -> tuple[dict[str, TensorMeta], dict[str, int], dict[str, str], int, int]:
    """Parse and check a safetensors header: metas, where each tensor begins, metadata, data start, file size."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SourceError(path, f"file is {size} bytes, too short to be safetensors (truncated?)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise SourceError(path, f"header claims {header_len} bytes (limit {MAX_HEADER_BYTES}); not a safetensors file?")
            if 8 + header_len > size:
                raise SourceError(
                    path, f"header claims {header_len} bytes but the file has only {size - 8} after the prefix (truncated?)"
                )
            raw = f.read(header_len)
        except OSError as e:
            raise SourceError(path, f"cannot read: {e.strerror or e}") from None

    def brief(value: object) -> str:  # a header value for a message: a lying header can hold megabytes
        text = repr(value)
        return text if len(text) <= 120 else f"{text[:100]}... ({len(text)} characters)"

    def mapping(pairs: tuple[tuple[str, object], ...]) -> dict[str, object]:
        obj = dict(pairs)
        if len(obj) < len(pairs):  # json would keep the last silently
            seen: set[str] = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise SourceError(path, f"header names {brief(twice)} twice; which one is meant?")
        return obj

    # Checkpoints with many tensors have few distinct (dtype, shape) pairs: each pair is
    # checked once, with the key in hand for the message, and shares one TensorMeta.  Every
    # entry of a known pair is then checked by ``compact`` as the JSON parser finishes it
    # and kept as a ``_Checked`` record, never as the parsed object: 200,000-tensor headers
    # stay small while parsed.  A shape of booleans or floats equals one of integers
    # ((2, True) == (2, 1)): with any in the header, no entry is taken as known.
    known: dict[tuple[str, tuple[int, ...]], TensorMeta] = {}
    floats: list[float] = []
    shareable = b"true" not in raw and b"false" not in raw

    def compact(pairs: list[tuple[str, object]]) -> object:
        if len(pairs) == 3 and shareable and not floats:
            (first, code), (second, shape), (third, offsets) = pairs
            if first != "dtype" or second != "shape" or third != "data_offsets":  # not in the usual order
                info = dict(pairs)
                code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if type(code) is str and type(shape) is list and type(offsets) is list and len(offsets) == 2:
                try:
                    meta = known.get((code, tuple(shape)))
                except TypeError:  # a dimension that is a list or an object: the full check says so
                    return tuple(pairs)
                if (
                    meta is None
                    and code in SAFETENSORS_DTYPES
                    and all(type(d) is int and d >= 0 for d in shape)
                    and (meta := _meta_for_torch(code, shape)) is not None  # type: ignore[arg-type]
                ):
                    known[(code, meta.shape)] = meta  # type: ignore[index]
                begin, end = offsets
                if meta is not None and type(begin) is int and type(end) is int and 0 <= begin and end - begin == meta.nbytes:
                    return _new_checked(_Checked, (meta, begin, end))
        # objects are kept as tuples of pairs, so a repeated name is caught (json keeps the last)
        return tuple(pairs)

    try:
        parsed = json.loads(raw, object_pairs_hook=compact, parse_float=lambda text: floats.append(float(text)) or floats[-1])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(path, f"header is not valid JSON ({e}); not a safetensors file?") from None
    except ValueError:  # Python refuses to convert integers of more than 4300 digits
        raise SourceError(path, "header holds a number thousands of digits long; not a safetensors file?") from None
    except RecursionError:
        raise SourceError(path, "header JSON is nested thousands of levels deep; not a safetensors file?") from None
    # JSON names are text; the one name no file can store holds a lone surrogate, which only a
    # ``\uD800``-``\uDFFF`` escape can spell: without one in the header, no name needs checking
    escaped_surrogates = _SURROGATE_ESCAPE.search(raw) is not None
    del raw
    if type(parsed) is not tuple:
        raise SourceError(path, "header is not a JSON object")
    header = mapping(parsed)
    del parsed

    data_start = 8 + header_len
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if type(metadata) is tuple:
        metadata = mapping(metadata)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SourceError(path, "__metadata__ must map strings to strings")
    for key, value in metadata.items():
        problem = key_problem(key) or key_problem(value)
        if problem:
            raise SourceError(path, f"__metadata__ entry {brief(key)}: its text {problem}")

    entries: list[tuple[int, str, TensorMeta]] = []
    for key, info in header.items():
        if escaped_surrogates:
            check_key(path, key)
        if type(info) is _Checked:
            meta, begin, end = info
        else:
            meta, begin, end = _checked_entry(path, brief, mapping, key, info)
        if end > data_size:
            raise SourceError(
                path,
                f"tensor {brief(key)}: data ends at byte {data_start + end} but the file has {size} bytes (truncated?)",
            )
        entries.append((begin, key, meta))
    del header

    entries.sort()  # by offset, then key (keys differ, so metas are never compared)
    previous_end, previous_key = 0, None
    for begin, key, meta in entries:
        if begin < previous_end and meta.nbytes:
            raise SourceError(path, f"tensors {brief(previous_key)} and {brief(key)} overlap in the data section")
        if meta.nbytes:
            previous_end, previous_key = begin + meta.nbytes, key
    metas = {key: meta for _, key, meta in entries}
    offsets_by_key = {key: begin for begin, key, _ in entries}
    return metas, offsets_by_key, dict(metadata), data_start, size


class ShardedSafetensors(Source):
    """A folder of safetensors shards: with ``model.safetensors.index.json`` or without one.

    Every tensor of every file read is accounted for, or the folder is refused: with an
    index, each shard must hold exactly the tensors the index puts in it, and a folder
    opened as such may hold no ``*.safetensors`` file the index does not name (open the
    index file itself to read only the shards it names).  Without an index, every
    ``*.safetensors`` file in the folder is a shard and no key may be in two of them.
    """

    format = "safetensors"

    def __init__(self, folder: str | os.PathLike[str], index: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder)
        self.name = str(self.folder)
        self._metadata: dict[str, str] = {}
        index_path = Path(index) if index else self.folder / INDEX_NAME
        expected: dict[str, Path] | None = None
        if index is not None or os.path.lexists(index_path):
            files, expected = self._read_index(index_path)
            if index is None:
                unnamed = [f for f in sorted(self.folder.glob("*.safetensors")) if f not in files]
                if unnamed:
                    raise SourceError(
                        unnamed[0],
                        f"is in the checkpoint folder but {INDEX_NAME} does not name it, so its tensors would be "
                        f"left out; move it away, or open {index_path} itself to read only the shards it names",
                    )
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise SourceError(self.folder, "no *.safetensors files and no model.safetensors.index.json here")
        self.shards = [SafetensorsFile(f) for f in files]
        self._owner: dict[str, SafetensorsFile] = {}
        self._metas: dict[str, TensorMeta] = {}
        for shard in self.shards:
            for key, meta in shard.metas().items():
                if expected is not None and expected.get(key) != shard.path:
                    listed = expected.get(key)
                    where = "does not list it" if listed is None else f"puts it in {_relative(listed, index_path)}"
                    raise SourceError(
                        shard.path,
                        f"holds tensor {key!r}, but {index_path.name} {where}; the index and the shards do not "
                        "belong together (every tensor a shard holds must be in the index's weight_map)",
                    )
                if key in self._owner:
                    raise SourceError(
                        shard.path, f"tensor {key!r} is also in {self._owner[key].path.name}; which one is meant?"
                    )
                self._owner[key] = shard
                self._metas[key] = meta
        if expected is not None:
            missing = [k for k in expected if k not in self._owner]
            if missing:
                more = f" ({len(missing) - 1} more tensors are missing too)" if len(missing) > 1 else ""
                raise SourceError(
                    index_path,
                    f"the index puts tensor {missing[0]!r} in {_relative(expected[missing[0]], index_path)}, "
                    f"but that shard has no such tensor{more}; the index and the shards do not belong together",
                )

    def _read_index(self, index_path: Path) -> tuple[list[Path], dict[str, Path]]:
        """The shard files the index names, and key -> the shard file the index puts it in."""
        repeated = _Repeated()
        try:
            with open_regular(index_path) as f:
                text = f.read().decode("utf-8")
            index = json.loads(text, object_pairs_hook=repeated.hook)
        except OSError as e:
            raise SourceError(index_path, f"cannot read the shard index: {e.strerror or e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError(index_path, f"the shard index is not valid JSON ({e}); re-download or regenerate it") from None
        except ValueError:  # Python refuses to convert integers of more than 4300 digits
            raise SourceError(
                index_path, "the shard index holds a number thousands of digits long; re-download or regenerate it"
            ) from None
        except RecursionError:
            raise SourceError(
                index_path, "the shard index is JSON nested thousands of levels deep; re-download or regenerate it"
            ) from None
        if repeated.keys:
            raise SourceError(
                index_path,
                f"the shard index names {repeated.keys[0][:200]!r} twice; which one is meant? (re-download or regenerate it)",
            )
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SourceError(index_path, "the shard index has no 'weight_map' object of key -> file name")
        if not weight_map:
            raise SourceError(index_path, "the shard index's weight_map is empty: it names no tensor and no shard")
        for key in weight_map:
            check_key(index_path, key)
        metadata = index.get("metadata") or {}
        self._metadata = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
        for key, value in self._metadata.items():
            problem = key_problem(key) or key_problem(value)
            if problem:
                raise SourceError(index_path, f"the shard index's metadata entry {key[:200]!r}: its text {problem}")
        files: list[Path] = []
        paths: dict[str, Path] = {}  # as the index spells it ("./a.safetensors") -> the shard's path
        for name in sorted(set(weight_map.values())):
            shown = repr(name) if len(name) <= 200 else f"{name[:150]!r}... ({len(name)} characters)"
            # Checked by name, not by resolving links: shards in a Hugging Face cache
            # snapshot are symlinks into ../../blobs and are fine.
            normal = os.path.normpath(name)
            if os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep):
                raise SourceError(index_path, f"shard {shown} lies outside the checkpoint folder; refusing to read it")
            if not name.endswith(".safetensors"):
                raise SourceError(
                    index_path,
                    f"shard {shown} is not a .safetensors file; only sharded safetensors are read "
                    "(load a sharded .bin checkpoint with transformers and save it with save_pretrained first)",
                )
            shard = index_path.parent / normal
            try:
                found = shard.exists()  # a FIFO or folder of that name is refused when it is opened
            except OSError as e:  # a name too long for the file system, ...
                raise SourceError(
                    index_path, f"shard {shown} named in the index cannot be looked up: {e.strerror or e}"
                ) from None
            if not found:
                where = f" (looked for {shard})" if len(name) <= 200 else ""
                raise SourceError(index_path, f"shard {shown} named in the index does not exist{where}")
            if shard not in files:
                files.append(shard)
            paths[name] = shard
        return files, {key: paths[name] for key, name in weight_map.items()}

    def metas(self) -> Mapping[str, TensorMeta]:
        return self._metas

    @property
    def metadata(self) -> Mapping[str, str]:
        merged: dict[str, str] = {}
        for shard in self.shards:
            merged.update(shard.metadata)
        merged.update(self._metadata)
        return merged

    def load(self, key: str) -> torch.Tensor:
        if key not in self._owner:
            raise SourceError(self.folder, f"no tensor named {key!r}")
        return self._owner[key].load(key)

    def raw_span(self, key: str) -> RawSpan:
        if key not in self._owner:
            raise SourceError(self.folder, f"no tensor named {key!r}")
        return self._owner[key].raw_span(key)

    def files(self) -> list[Path]:
        return [shard.path for shard in self.shards]

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


def _relative(shard: Path, index_path: Path) -> str:
    """A shard's path as an index names it: relative to the index's folder."""
    return os.path.relpath(shard, index_path.parent)
