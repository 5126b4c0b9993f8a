"""GGUF reader (llama.cpp's format): metadata from the header, tensors on demand.

The header is parsed here with :mod:`struct` rather than with
``gguf.GGUFReader``, for two reasons.  ``GGUFReader`` builds one numpy view per
array element, so a 262k-token vocabulary takes over ten seconds to open, and it
trusts the header: a lying count or offset surfaces as an ``IndexError`` or a
reshape failure from deep inside numpy.  Here every count, length and offset is
checked against the file size before it is used, and every failure is a
:class:`~statebridge.errors.SourceError` naming the file (and the field or
tensor).  The ``gguf`` package still supplies the format's constants (value
types, quantization types, block sizes) and the dequantization kernels.

Shapes are reported in PyTorch order.  GGUF stores dimensions fastest first
(``ne[0]`` is the row length), as ggml does, so the torch shape is
``reversed(ne)`` -- the inverse of what llama.cpp's convert scripts and
``gguf.GGUFWriter`` do when they write a numpy array.

Unquantized tensors (F32, F16, BF16, F64, I8..I64) load as zero-copy views of a
private copy-on-write memory map in their own dtype.  Quantized tensors (Q4_K,
Q5_0, Q6_K, Q8_0, ...) are dequantized to float32 on each load, and
:meth:`GGUFSource.metas` reports them as float32 so that plans match what
:meth:`GGUFSource.load` returns, with their stored type in ``TensorMeta.stored``:
a plan that leaves such a tensor unchanged copies its blocks, bytes and type, into a
GGUF target (:meth:`GGUFSource.stored_span`).  The stored GGML type of every tensor is
in :attr:`GGUFSource.gguf_types`.

Array fields (a vocabulary of a quarter of a million strings, its scores) are checked while
the header is read but kept as the bytes the file stores, and decoded only when someone asks
for their value (:class:`GGUFField`): opening Gemma 3's header takes a few hundredths of a
second, and a GGUF target writes the bytes back as they were.

A split GGUF (llama.cpp's ``NAME-00001-of-0000N.gguf`` parts) is opened through its first
part by :func:`open_gguf` as one source: every tensor of every part, the first part's
key-values; ``GGUFSource(path)`` alone reads one file, a part as the file it is.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys
from gguf import quants as gguf_quants

from ..errors import SourceError
from ..tensors.meta import DTYPES, DType, TensorMeta
from ..tensors.provenance import FINGERPRINT_KEY
from .base import RawSpan, Source, open_regular

if TYPE_CHECKING:
    import torch

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
#: ggml tensors have at most 4 dimensions; allow some slack for other writers
MAX_DIMS = 8
#: arrays nested deeper than this are refused (the format allows nesting; nobody uses it)
MAX_ARRAY_DEPTH = 4
#: arrays longer than this appear in :attr:`GGUFSource.metadata` as ``"[N items]"``
MAX_METADATA_ARRAY_ITEMS = 256
MAX_METADATA_ARRAY_CHARS = 16 * 1024

#: GGML types whose stored bytes are plain little-endian values of a torch dtype
PLAIN_TYPES: dict[GGMLQuantizationType, DType] = {
    GGMLQuantizationType.F32: DTYPES["float32"],
    GGMLQuantizationType.F16: DTYPES["float16"],
    GGMLQuantizationType.BF16: DTYPES["bfloat16"],
    GGMLQuantizationType.F64: DTYPES["float64"],
    GGMLQuantizationType.I8: DTYPES["int8"],
    GGMLQuantizationType.I16: DTYPES["int16"],
    GGMLQuantizationType.I32: DTYPES["int32"],
    GGMLQuantizationType.I64: DTYPES["int64"],
}

# struct format and size of each scalar value type (prefix added per byte order)
_SCALARS: dict[GGUFValueType, tuple[str, int]] = {
    GGUFValueType.UINT8: ("B", 1),
    GGUFValueType.INT8: ("b", 1),
    GGUFValueType.UINT16: ("H", 2),
    GGUFValueType.INT16: ("h", 2),
    GGUFValueType.UINT32: ("I", 4),
    GGUFValueType.INT32: ("i", 4),
    GGUFValueType.FLOAT32: ("f", 4),
    GGUFValueType.BOOL: ("B", 1),
    GGUFValueType.UINT64: ("Q", 8),
    GGUFValueType.INT64: ("q", 8),
    GGUFValueType.FLOAT64: ("d", 8),
}
_NUMPY_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "u1",
    GGUFValueType.INT8: "i1",
    GGUFValueType.UINT16: "u2",
    GGUFValueType.INT16: "i2",
    GGUFValueType.UINT32: "u4",
    GGUFValueType.INT32: "i4",
    GGUFValueType.FLOAT32: "f4",
    GGUFValueType.BOOL: "u1",
    GGUFValueType.UINT64: "u8",
    GGUFValueType.INT64: "i8",
    GGUFValueType.FLOAT64: "f8",
}
# smallest encoding of one value of each type (used to refuse absurd counts early)
_MIN_VALUE_BYTES = {**{t: size for t, (_, size) in _SCALARS.items()}, GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
#: llama.cpp's split keys (``gguf.Keys.Split``): the part's index from 0, the number of parts, all parts' tensors
SPLIT_NO_KEY = Keys.Split.LLM_KV_SPLIT_NO
SPLIT_COUNT_KEY = Keys.Split.LLM_KV_SPLIT_COUNT
SPLIT_TENSORS_KEY = Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT
#: a split part's name, as llama.cpp's ``llama_split_path`` makes it
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<index>[0-9]{5})-of-(?P<count>[0-9]{5})\.gguf$")
_INTEGER_TYPES = {t for t in _NUMPY_SCALARS if t not in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64, GGUFValueType.BOOL)}

# string length (8) + n_dims (4) + type (4) + offset (8)
_MIN_TENSOR_INFO_BYTES = 24
# key length (8) + value type (4) + smallest value (1)
_MIN_KV_BYTES = 13


class GGUFField:
    """One GGUF key-value field with its stored type, so it can be written back unchanged.

    ``sub_type`` is the element type of an ``ARRAY`` (``None`` otherwise).  String
    values that are not valid UTF-8 are kept as ``bytes``.

    A field read from a little-endian file keeps its arrays as :attr:`encoded`, the bytes the
    file stores after the value type (element type, count, items), and decodes them into
    :attr:`value` only when asked: a 262,144-token vocabulary costs a fifth of a second to decode
    into Python strings and as much to encode again, while a run that carries it unchanged
    needs neither (the writer copies :attr:`encoded`).  Fields compare equal when their types and
    values are equal.  Treat a value as read-only: to change a field, make a new one.
    """

    __slots__ = ("type", "sub_type", "encoded", "_value", "_decode", "_count")

    def __init__(self, value: Any, type: GGUFValueType, sub_type: GGUFValueType | None = None) -> None:
        self.type = type
        self.sub_type = sub_type
        #: the value as a little-endian GGUF file stores it after its type tag, when it was read from one
        self.encoded: bytes | None = None
        self._value = value
        self._decode: Callable[[], Any] | None = None
        self._count: int | None = None

    @classmethod
    def stored(cls, type: GGUFValueType, sub_type: GGUFValueType | None, encoded: bytes, count: int, decode: Callable[[], Any]) -> GGUFField:
        """A field known by its stored bytes (``count`` items), decoded by ``decode()`` on first use of :attr:`value`."""
        field = cls(None, type, sub_type)
        field.encoded, field._decode, field._count = encoded, decode, count
        return field

    @property
    def value(self) -> Any:
        if self._decode is not None:
            self._value, self._decode = self._decode(), None
        return self._value

    @property
    def count(self) -> int | None:
        """The number of items of an array (without decoding them); None for other types."""
        if self.type != GGUFValueType.ARRAY:
            return None
        return self._count if self._count is not None else len(self.value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GGUFField):
            return NotImplemented
        if (self.type, self.sub_type) != (other.type, other.sub_type):
            return False
        if self.encoded is not None and self.encoded == other.encoded:
            return True
        return bool(self.value == other.value)

    __hash__ = None  # type: ignore[assignment]  # values may be lists

    def __repr__(self) -> str:
        if self._decode is not None:
            return f"GGUFField(<{self._count} {self.sub_type.name if self.sub_type else ''} items>, {self.type!r}, {self.sub_type!r})"
        return f"GGUFField({self._value!r}, {self.type!r}, {self.sub_type!r})"


@dataclass(frozen=True)
class _TensorInfo:
    path: Path  # the file (the part of a split GGUF) holding its data
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order
    offset: int  # absolute, in the file
    nbytes: int


class GGUFSource(Source):
    """One ``.gguf`` file, or every part of a split GGUF (see :func:`open_gguf`).

    Attributes beyond :class:`Source`: :attr:`fields` (key -> Python value, decoded on access),
    :attr:`typed_fields` (key -> :class:`GGUFField`), :attr:`gguf_types`
    (tensor -> GGML type name such as ``"Q4_K"``), :attr:`version`,
    :attr:`alignment`, :attr:`data_offset` and :attr:`byte_order` (all of the first
    file), and :attr:`parts` (the files, in order).
    """

    format = "gguf"

    def __init__(self, path: str | os.PathLike[str], *, parts: Sequence[_Header] | None = None) -> None:
        """Read ``path`` alone; ``parts`` are the parsed headers of a split GGUF's files, ``path``'s first."""
        self.path = Path(path)
        self.name = str(self.path)
        self._maps: dict[Path, mmap.mmap] = {}
        headers = list(parts) if parts else [_Header(self.path)]
        header = headers[0]
        #: the files read, in order: ``path`` alone, or every part of a split GGUF
        self.parts: list[Path] = [h.path for h in headers]
        self.version: int = header.version
        self.alignment: int = header.alignment
        self.data_offset: int = header.data_offset
        #: ``"little"`` or ``"big"``; big-endian files come from s390x builds of llama.cpp
        self.byte_order: str = header.byte_order
        self.typed_fields: dict[str, GGUFField] = header.fields
        self.fields: Mapping[str, Any] = _Values(header.fields)
        self._tensors: dict[str, _TensorInfo] = {}
        for part in headers:
            for key, info in part.tensors.items():
                if key in self._tensors:
                    raise SourceError(part.path, f"tensor {key!r} is also in {self._tensors[key].path.name}, an earlier part")
                self._tensors[key] = info
        self.gguf_types: dict[str, str] = {k: t.qtype.name for k, t in self._tensors.items()}
        self._metas = {k: _meta(t, self.byte_order) for k, t in self._tensors.items()}
        self._metadata = {k: _field_to_string(f) for k, f in header.fields.items()}

    def metas(self) -> Mapping[str, TensorMeta]:
        return self._metas

    @property
    def metadata(self) -> Mapping[str, str]:
        """Every key-value field as a string: scalars via ``str()``, short arrays as JSON, long ones as ``"[N items]"``."""
        return self._metadata

    def is_quantized(self, key: str) -> bool:
        """Whether the tensor is stored in a block-quantized type (and so dequantized on load)."""
        return self._info(key).qtype not in PLAIN_TYPES

    def raw_span(self, key: str) -> RawSpan | None:
        info = self._info(key)
        if info.qtype not in PLAIN_TYPES or self.byte_order != "little":
            return None
        return RawSpan(info.path, info.offset, info.nbytes)

    def stored_span(self, key: str) -> RawSpan | None:
        """Where a tensor's stored bytes lie whatever their type (quantized blocks too), for a GGUF target.

        None for big-endian files, whose bytes would need swapping (their quantized tensors
        carry no ``stored`` type in :meth:`metas` either).
        """
        info = self._info(key)
        if self.byte_order != "little":
            return None
        return RawSpan(info.path, info.offset, info.nbytes)

    def load(self, key: str) -> torch.Tensor:
        import torch

        info = self._info(key)
        meta = self._metas[key]
        if meta.numel == 0:
            return torch.empty(meta.shape, dtype=meta.dtype.torch)
        buffer = self._map(info.path)
        dtype = PLAIN_TYPES.get(info.qtype)
        if dtype is not None:
            tensor = torch.frombuffer(buffer, dtype=dtype.torch, count=meta.numel, offset=info.offset)
            if info.offset % dtype.itemsize:
                tensor = tensor.clone()  # a misaligned view is legal but slow and fragile; copy it
            if self.byte_order != sys.byteorder:
                tensor = _byteswapped(tensor)
            return tensor.reshape(meta.shape)
        return self._dequantize(key, info, buffer)

    def _dequantize(self, key: str, info: _TensorInfo, buffer: mmap.mmap) -> torch.Tensor:
        import torch

        if self.byte_order != "little":
            raise SourceError(
                info.path, f"tensor {key!r}: {info.qtype.name} data in a big-endian GGUF file cannot be dequantized"
            )
        block_size, type_size = GGML_QUANT_SIZES[info.qtype]
        # a quantized tensor has a row: the header check refused rows (1 without a shape) that are not whole blocks
        byte_shape = (*info.shape[:-1], info.shape[-1] // block_size * type_size)
        blocks = np.frombuffer(buffer, dtype=np.uint8, count=info.nbytes, offset=info.offset).reshape(byte_shape)
        try:
            values = gguf_quants.dequantize(blocks, info.qtype)
        except NotImplementedError:
            raise SourceError(
                info.path,
                f"tensor {key!r}: the installed gguf package cannot dequantize {info.qtype.name} "
                "(upgrade gguf, or requantize the model with llama-quantize)",
            ) from None
        except Exception as e:  # a kernel failing on bad bytes; name the tensor rather than leak numpy internals
            raise SourceError(info.path, f"tensor {key!r}: cannot dequantize {info.qtype.name} data: {e}") from None
        # gguf gives the blocks' shape with each row of blocks turned into its values: the tensor's own shape
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    def _info(self, key: str) -> _TensorInfo:
        try:
            return self._tensors[key]
        except KeyError:
            raise SourceError(self.path, f"no tensor named {key!r}") from None

    def _map(self, path: Path) -> mmap.mmap:
        buffer = self._maps.get(path)
        if buffer is None:
            try:
                with open_regular(path) as f:
                    buffer = self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise SourceError(path, f"cannot map the file: {e}") from None
        return buffer

    def files(self) -> list[Path]:
        return list(self.parts)

    def close(self) -> None:
        # Tensors handed out keep the maps alive through their buffers.
        self._maps = {}


class _Values(Mapping[str, Any]):
    """Key -> value of the fields, each decoded when first asked for (see :class:`GGUFField`)."""

    def __init__(self, fields: Mapping[str, GGUFField]) -> None:
        self._fields = fields

    def __getitem__(self, key: str) -> Any:
        return self._fields[key].value

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


def open_gguf(path: str | os.PathLike[str]) -> GGUFSource:
    """A GGUF file; for the first part of a split GGUF, the whole model (what :func:`~statebridge.readers.open_source` gives).

    llama.cpp's ``gguf-split`` writes ``NAME-00001-of-0000N.gguf`` ... ``NAME-0000N-of-0000N.gguf``:
    every part holds ``split.no`` (from 0), ``split.count`` and ``split.tensors.count``; the
    first holds the model's key-values too, and tensors are never cut across parts.  The
    first part opens the whole set, as in llama.cpp (the other parts are found by name);
    another part is refused with the name of the first, since its key-values are not the
    model's.  A missing part, a part whose split keys or provenance do not match the first's,
    and a set whose tensors do not add up to ``split.tensors.count`` are each one
    :class:`~statebridge.errors.SourceError` naming the file.
    """
    path = Path(path)
    first = _Header(path)
    split = _split_keys(first)
    if split is None or split[1] <= 1:
        return GGUFSource(path, parts=[first])
    number, count, total = split
    names = split_names(path)
    if names is None or names[1] != count:
        expected = f"-{number + 1:05d}-of-{count:05d}.gguf"
        raise SourceError(
            path, f"is part {number + 1} of a {count}-part split GGUF, but its name does not end in {expected!r}, "
            "so its other parts cannot be found; give it back its llama.cpp name"
        )
    prefix = names[0]
    if number != 0:
        raise SourceError(
            path, f"is part {number + 1} of {count} of a split GGUF, which holds its tensors only; "
            f"open its first part, {split_path(prefix, 0, count).name}"
        )
    headers = [first]
    for index in range(1, count):
        part = split_path(prefix, index, count)
        if not part.exists():
            raise SourceError(part, f"is missing: it is part {index + 1} of the {count}-part split GGUF {path.name}")
        header = _Header(part)
        if _split_keys(header) != (index, count, total):
            raise SourceError(
                part, f"is not part {index + 1} of {count} of {path.name}: its split keys say "
                f"{_describe_split(_split_keys(header))} where {_describe_split((index, count, total))} was expected"
            )
        mine, theirs = (h.fields.get(FINGERPRINT_KEY) for h in (header, first))
        if mine is not None and theirs is not None and mine != theirs:
            raise SourceError(part, f"belongs to another model than {path.name}: its {FINGERPRINT_KEY} differs")
        if header.byte_order != first.byte_order:
            raise SourceError(part, f"is {header.byte_order}-endian but {path.name} is {first.byte_order}-endian")
        headers.append(header)
    found = sum(len(h.tensors) for h in headers)
    if found != total:
        raise SourceError(
            path, f"its {count} parts hold {found} tensors but {SPLIT_TENSORS_KEY} says {total}: a part of another model?"
        )
    return GGUFSource(path, parts=headers)


def split_names(path: Path) -> tuple[Path, int, int] | None:
    """``(prefix, count, index)`` of a file named as a split part (``PREFIX-00002-of-00003.gguf`` gives index 1), else None."""
    match = _SPLIT_NAME.match(path.name)
    if match is None:
        return None
    index, count = int(match["index"]), int(match["count"])
    if not 1 <= index <= count:
        return None
    return path.with_name(match["prefix"]), count, index - 1


def split_path(prefix: Path, index: int, count: int) -> Path:
    """The file of part ``index`` (from 0) of ``count``, as llama.cpp names it (``%s-%05d-of-%05d.gguf``)."""
    return prefix.with_name(f"{prefix.name}-{index + 1:05d}-of-{count:05d}.gguf")


def _split_keys(header: _Header) -> tuple[int, int, int] | None:
    """``(split.no, split.count, split.tensors.count)`` of a header, None when it has no ``split.count``."""
    if SPLIT_COUNT_KEY not in header.fields:
        return None
    values = []
    for key in (SPLIT_NO_KEY, SPLIT_COUNT_KEY, SPLIT_TENSORS_KEY):
        field = header.fields.get(key)
        if field is None:
            raise SourceError(header.path, f"has {SPLIT_COUNT_KEY} but no {key}: a damaged split GGUF part")
        if field.type not in _INTEGER_TYPES or field.value < 0:
            raise SourceError(header.path, f"{key} is {field.value!r} ({field.type.name}), not a count")
        values.append(int(field.value))
    number, count, total = values
    if count and number >= count:
        raise SourceError(header.path, f"{SPLIT_NO_KEY} is {number} but {SPLIT_COUNT_KEY} is only {count}")
    return number, count, total


def _describe_split(split: tuple[int, int, int] | None) -> str:
    if split is None:
        return "nothing (no split keys)"
    number, count, total = split
    return f"part {number + 1} of {count}, {total} tensors in all"


def _meta(info: _TensorInfo, byte_order: str) -> TensorMeta:
    """A tensor's meta: plain types in their own dtype; quantized ones as float32 (what loading gives), stored as their type."""
    plain = PLAIN_TYPES.get(info.qtype)
    if plain is not None:
        return TensorMeta(info.shape, plain)
    return TensorMeta(info.shape, DTYPES["float32"], info.qtype.name if byte_order == "little" else None)


def _byteswapped(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` with every element's bytes reversed (numpy has no bfloat16, so go via int16)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return torch.from_numpy(tensor.view(torch.int16).numpy().byteswap()).view(torch.bfloat16)
    return torch.from_numpy(tensor.numpy().byteswap())


class _Cursor:
    """Bounds-checked reads of GGUF values from a buffer; every failure is a :class:`SourceError` naming the file."""

    def __init__(self, path: Path, buf: Any, size: int, pos: int, order: str) -> None:
        self.path, self.buf, self.size, self.pos, self.order = path, buf, size, pos, order

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise SourceError(
                self.path,
                f"header is cut short reading {what} at byte {self.pos} (needs {n} bytes, file has {self.size}; truncated?)",
            )

    def _scalar(self, vtype: GGUFValueType, what: str) -> Any:
        fmt, n = _SCALARS[vtype]
        self._need(n, what)
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return bool(value) if vtype == GGUFValueType.BOOL else value

    def _u32(self, what: str) -> int:
        return self._scalar(GGUFValueType.UINT32, what)

    def _u64(self, what: str) -> int:
        return self._scalar(GGUFValueType.UINT64, what)

    def _raw_string(self, what: str) -> bytes:
        n = self._u64(f"the length of {what}")
        self._need(n, f"{what} ({n} bytes)")
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def _strings(self, count: int, what: str) -> list[str | bytes]:
        """``count`` strings, as :meth:`_raw_string` reads them one by one, in a tight loop.

        A vocabulary holds a quarter of a million; method calls per item took over a second.
        """
        buf, pos, size = self.buf, self.pos, self.size
        length = struct.Struct(self.order + "Q").unpack_from
        out: list[str | bytes] = []
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self._need(8, f"the length of {what}")
            (n,) = length(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                self._need(n, f"{what} ({n} bytes)")
            raw = buf[pos : pos + n]
            pos += n
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(raw)  # some vocabularies hold raw byte tokens; keep them exact
        self.pos = pos
        return out

    def _skip_strings(self, count: int, what: str) -> None:
        """Step over ``count`` strings without decoding them (a vocabulary in a few hundredths of a second).

        Only the lengths are read; where one runs past the end, :meth:`_strings` reads them again
        to name the string that does.
        """
        buf, pos = self.buf, self.pos
        length = struct.Struct(self.order + "Q").unpack_from
        try:
            for _ in range(count):
                pos += 8 + length(buf, pos)[0]
        except struct.error:  # a length field past the end of the buffer
            pos = self.size + 1
        if pos > self.size:
            self._strings(count, what)  # raises, naming the string cut short
            raise SourceError(self.path, f"{what} runs past the end of the file (truncated?)")  # pragma: no cover
        self.pos = pos

    def _name(self, what: str) -> str:
        raw = self._raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(self.path, f"{what} {raw[:60]!r} is not valid UTF-8") from None

    def _value_type(self, what: str) -> GGUFValueType:
        raw = self._u32(f"the value type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise SourceError(self.path, f"{what} has unknown value type {raw}") from None

    def _field(self, vtype: GGUFValueType, what: str) -> GGUFField:
        """A key-value field's value; arrays of a little-endian file are checked and kept encoded (see :class:`GGUFField`)."""
        if vtype != GGUFValueType.ARRAY or self.order != "<":
            value, sub_type = self._value(vtype, what, depth=0)
            return GGUFField(value, vtype, sub_type)
        start = self.pos
        sub_type, count = self._array_head(what, depth=0)
        if sub_type in _SCALARS:
            n = count * _SCALARS[sub_type][1]
            self._need(n, what)
            self.pos += n
        elif sub_type == GGUFValueType.STRING:
            self._skip_strings(count, what)
        else:
            for _ in range(count):
                self._value(sub_type, what, depth=1)
        encoded = bytes(self.buf[start : self.pos])
        return GGUFField.stored(vtype, sub_type, encoded, count, _ArrayDecoder(self.path, encoded, what))

    def _array_head(self, what: str, depth: int) -> tuple[GGUFValueType, int]:
        if depth >= MAX_ARRAY_DEPTH:
            raise SourceError(self.path, f"{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
        sub_type = self._value_type(f"the elements of {what}")
        count = self._u64(f"the length of {what}")
        if count * _MIN_VALUE_BYTES[sub_type] > self.size - self.pos:
            raise SourceError(
                self.path, f"{what} claims {count} {sub_type.name} items, more than the rest of the file can hold (truncated?)"
            )
        return sub_type, count

    def _value(self, vtype: GGUFValueType, what: str, depth: int) -> tuple[Any, GGUFValueType | None]:
        if vtype in _SCALARS:
            return self._scalar(vtype, what), None
        if vtype == GGUFValueType.STRING:
            return _decode(self._raw_string(what)), None
        sub_type, count = self._array_head(what, depth)
        if sub_type in _NUMPY_SCALARS:
            n = count * _SCALARS[sub_type][1]
            self._need(n, what)
            array = np.frombuffer(self.buf, dtype=np.dtype(_NUMPY_SCALARS[sub_type]).newbyteorder(self.order), count=count, offset=self.pos)
            self.pos += n
            if sub_type == GGUFValueType.BOOL:
                return [bool(v) for v in array], sub_type
            return array.tolist(), sub_type
        if sub_type == GGUFValueType.STRING:
            return self._strings(count, what), sub_type
        return [self._value(sub_type, what, depth + 1)[0] for _ in range(count)], sub_type


@dataclass(frozen=True)
class _ArrayDecoder:
    """Decodes an array field's :attr:`GGUFField.encoded` bytes (already checked while the header was read)."""

    path: Path
    encoded: bytes
    what: str

    def __call__(self) -> list[Any]:
        return _Cursor(self.path, self.encoded, len(self.encoded), 0, "<")._value(GGUFValueType.ARRAY, self.what, depth=0)[0]


class _Header(_Cursor):
    """A checked parse of a GGUF header: fields, tensor infos, data offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open_regular(path) as f:
            try:
                size = os.fstat(f.fileno()).st_size
                magic = f.read(4)
                if magic != GGUF_MAGIC:
                    if len(magic) < 4:
                        raise SourceError(path, f"file is {size} bytes, too short to be GGUF (truncated?)")
                    raise SourceError(path, f"not a GGUF file: starts with {magic!r}, expected {GGUF_MAGIC!r}")
                if size < 24:
                    raise SourceError(path, f"file is {size} bytes, too short for a GGUF header (truncated?)")
                # The header is read through a read-only map: only the pages it spans are touched,
                # so opening a multi-gigabyte model reads the header and nothing of the tensor data.
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    try:
                        self._parse(buf, size)
                    finally:
                        self.buf = b""  # drop the reference before the map closes
            except OSError as e:
                raise SourceError(path, f"cannot read: {e.strerror or e}") from None

    # -- structure ----------------------------------------------------------------------------

    def _parse(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 4
        (version,) = struct.unpack_from("<I", buf, 4)
        self.order, self.byte_order = "<", "little"
        if version & 0xFFFF == 0 and version != 0:
            # written on a big-endian machine: everything after the magic is byte-swapped
            (version,) = struct.unpack_from(">I", buf, 4)
            self.order, self.byte_order = ">", "big"
        if version == 1:
            raise SourceError(self.path, "GGUF version 1 is not supported (it predates 64-bit counts); reconvert the model")
        if version not in SUPPORTED_VERSIONS:
            raise SourceError(self.path, f"unsupported GGUF version {version} (this reader knows versions 2 and 3)")
        self.version = version
        self.pos = 8
        tensor_count = self._u64("the tensor count")
        kv_count = self._u64("the key-value count")
        if kv_count * _MIN_KV_BYTES > size - self.pos:
            raise SourceError(
                self.path, f"header claims {kv_count} key-value fields, more than a {size}-byte file can hold (corrupt or truncated)"
            )
        if tensor_count * _MIN_TENSOR_INFO_BYTES > size - self.pos:
            raise SourceError(
                self.path, f"header claims {tensor_count} tensors, more than a {size}-byte file can hold (corrupt or truncated)"
            )

        self.fields: dict[str, GGUFField] = {}
        for i in range(kv_count):
            key = self._name(f"the name of key-value field #{i}")
            if key in self.fields:
                raise SourceError(self.path, f"key-value field {key!r} appears twice")
            vtype = self._value_type(f"field {key!r}")
            self.fields[key] = self._field(vtype, f"field {key!r}")

        self.alignment = DEFAULT_ALIGNMENT
        align = self.fields.get("general.alignment")
        if align is not None:
            if align.type != GGUFValueType.UINT32:
                raise SourceError(self.path, f"general.alignment has type {align.type.name}, expected UINT32")
            if align.value <= 0 or align.value & (align.value - 1):
                raise SourceError(self.path, f"general.alignment is {align.value}, not a power of two")
            self.alignment = align.value

        infos: list[tuple[str, list[int], int, int]] = []
        seen: set[str] = set()
        for i in range(tensor_count):
            name = self._name(f"the name of tensor #{i}")
            if name in seen:
                raise SourceError(self.path, f"tensor {name!r} appears twice in the header")
            seen.add(name)
            n_dims = self._u32(f"the dimension count of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise SourceError(self.path, f"tensor {name!r} claims {n_dims} dimensions (at most {MAX_DIMS} are plausible)")
            ne = [self._u64(f"the shape of tensor {name!r}") for _ in range(n_dims)]
            raw_type = self._u32(f"the type of tensor {name!r}")
            offset = self._u64(f"the data offset of tensor {name!r}")
            infos.append((name, ne, raw_type, offset))

        self.data_offset = -(-self.pos // self.alignment) * self.alignment
        self.tensors = self._check_tensors(infos)

    def _check_tensors(self, infos: list[tuple[str, list[int], int, int]]) -> dict[str, _TensorInfo]:

        data_size = self.size - self.data_offset
        if infos and data_size < 0:
            raise SourceError(self.path, f"the tensor data section would start at byte {self.data_offset}, past the end of the file (truncated?)")
        checked: list[tuple[int, int, str, _TensorInfo]] = []
        for index, (name, ne, raw_type, offset) in enumerate(infos):
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise SourceError(self.path, f"tensor {name!r} has unknown GGML type {raw_type}") from None
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            numel = math.prod(ne)
            row = ne[0] if ne else 1
            if row % block_size:
                raise SourceError(
                    self.path, f"tensor {name!r}: row length {row} is not a multiple of the {qtype.name} block size {block_size}"
                )
            nbytes = numel // block_size * type_size
            if offset % self.alignment:
                raise SourceError(self.path, f"tensor {name!r}: data offset {offset} is not a multiple of the alignment {self.alignment}")
            if offset + nbytes > data_size:
                raise SourceError(
                    self.path,
                    f"tensor {name!r}: data ends at byte {self.data_offset + offset + nbytes} "
                    f"but the file has {self.size} bytes (truncated?)",
                )
            # torch computes sizes and strides in int64, even for a tensor with no elements
            extent = PLAIN_TYPES.get(qtype, DTYPES["float32"]).itemsize * math.prod(max(d, 1) for d in ne)
            if extent >= 2**63:
                raise SourceError(
                    self.path, f"tensor {name!r}: shape {list(reversed(ne))} is too large for torch (its sizes overflow int64)"
                )
            info = _TensorInfo(self.path, qtype, tuple(reversed(ne)), self.data_offset + offset, nbytes)
            checked.append((offset, index, name, info))
        checked.sort()
        previous_end, previous_name = 0, None
        for offset, _, name, info in checked:
            if info.nbytes and offset < previous_end:
                raise SourceError(self.path, f"tensors {previous_name!r} and {name!r} overlap in the data section")
            if info.nbytes:
                previous_end, previous_name = offset + info.nbytes, name
        return {name: info for _, _, name, info in checked}


def _decode(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw  # some vocabularies hold raw byte tokens; keep them exact


def _field_to_string(field: GGUFField) -> str:
    if field.type == GGUFValueType.ARRAY:
        if field.count is not None and field.count > MAX_METADATA_ARRAY_ITEMS:
            return f"[{field.count} items]"  # without decoding them
        items = field.value
        text = json.dumps([_jsonable(v, field.sub_type) for v in items], ensure_ascii=False)
        return text if len(text) <= MAX_METADATA_ARRAY_CHARS else f"[{len(items)} items]"
    if field.type == GGUFValueType.FLOAT32:
        return str(np.float32(field.value))  # shortest text that round-trips the stored float32
    if isinstance(field.value, bytes):
        return field.value.decode("utf-8", errors="replace")
    return str(field.value)


def _jsonable(value: Any, vtype: GGUFValueType | None) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if vtype == GGUFValueType.FLOAT32 and isinstance(value, float) and math.isfinite(value):
        return float(str(np.float32(value)))
    if isinstance(value, list):
        return [_jsonable(v, None) for v in value]
    return value
