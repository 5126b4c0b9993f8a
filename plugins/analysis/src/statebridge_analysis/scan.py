"""Read every tensor of a source once, in storage order, a few MB at a time: checksum and value counts.

Lint needs, per tensor, the sha256 of its bytes, whether it holds NaN or Inf, whether it is all
zero, and whether all its elements are equal.  A tensor a reader can point at in its file (a
:class:`~statebridge.RawSpan`: safetensors, plain GGUF tensors) is read in chunks of
:data:`CHUNK` bytes and examined with numpy on its raw bit patterns, so memory stays bounded
whatever the tensor's size and torch is never imported.  Other tensors (torch pickles, in-memory
states, quantized GGUF tensors' values) are loaded one at a time through the reader.

The checksum is of the bytes as stored: for a plain tensor that is its elements row-major,
little-endian, the same in every format, so a manifest written from a safetensors file verifies
the same tensors in a ``.pt`` file; for a block-quantized GGUF tensor it is of its blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from statebridge.errors import SourceError

if TYPE_CHECKING:
    from statebridge import RawSpan, Source, TensorMeta

#: bytes read at a time: a multiple of every element size, small enough to bound memory
CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Bits:
    """How to see non-finite and zero values in a float type's bit patterns (no float decoding needed)."""

    view: type  # the unsigned integer type of the element's size
    exponent: int  # the exponent bits: all set means Inf or NaN (where the type has them)
    mantissa: int  # with the exponent all set, a non-zero mantissa is NaN, zero is Inf
    sign: int
    #: float8_e4m3fn has no Inf and one NaN pattern per sign (exponent and mantissa all set)
    nan_only: bool = False


FLOAT_BITS: dict[str, Bits] = {
    "float16": Bits(np.uint16, 0x7C00, 0x03FF, 0x8000),
    "bfloat16": Bits(np.uint16, 0x7F80, 0x007F, 0x8000),
    "float32": Bits(np.uint32, 0x7F800000, 0x007FFFFF, 0x80000000),
    "float64": Bits(np.uint64, 0x7FF0000000000000, 0x000FFFFFFFFFFFFF, 0x8000000000000000),
    "float8_e5m2": Bits(np.uint8, 0x7C, 0x03, 0x80),
    "float8_e4m3fn": Bits(np.uint8, 0x7F, 0x00, 0x80, nan_only=True),
}
#: unsigned views for the other element sizes (integers and bool: zero is all bits clear)
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass
class TensorScan:
    """What one pass over a tensor's bytes found."""

    key: str
    sha256: str
    numel: int
    nan: int = 0
    inf: int = 0
    #: index (flattened) of the first NaN or Inf, or None
    first_bad: int | None = None
    #: every element is zero (+0 or -0)
    zero: bool = False
    #: every element has the same bit pattern (a constant tensor, e.g. freshly initialised norms)
    constant: bool = False
    #: whether the values were examined (False for a dtype without a known bit layout: only the checksum holds)
    checked_values: bool = True


class _Counter:
    """Accumulates one tensor's counts chunk by chunk."""

    def __init__(self, dtype: str, itemsize: int) -> None:
        self.bits = FLOAT_BITS.get(dtype)
        self.view = self.bits.view if self.bits else UINT.get(itemsize)
        self.nan = self.inf = self.seen = 0
        self.first_bad: int | None = None
        self.zero = self.constant = True
        self.first: int | None = None

    def add(self, data: memoryview | bytes) -> None:
        if self.view is None or not len(data):
            return
        x = np.frombuffer(data, dtype=self.view)
        if self.first is None:
            self.first = int(x[0])
        if self.constant and not bool((x == self.first).all()):
            self.constant = False
        bits = self.bits
        if bits is None:
            if self.zero and bool(x.any()):
                self.zero = False
        else:
            if self.zero and bool((x & self.view(_mask(self.view) ^ bits.sign)).any()):
                self.zero = False  # -0.0 is zero too
            special = (x & self.view(bits.exponent)) == bits.exponent
            if special.any():
                mantissa = (x & self.view(bits.mantissa)) != 0
                nan = int((special & mantissa).sum()) if not bits.nan_only else int(special.sum())
                inf = int(special.sum()) - nan
                self.nan += nan
                self.inf += inf
                if self.first_bad is None:
                    self.first_bad = self.seen + int(np.flatnonzero(special)[0])
        self.seen += len(x)


def _mask(view: type) -> int:
    return (1 << (8 * np.dtype(view).itemsize)) - 1


class Scanner:
    """Reads tensors of one source; keeps one file handle per file and one reusable buffer."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._files: dict[Path, BinaryIO] = {}
        self._buffer = bytearray(CHUNK)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "Scanner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scan_all(self) -> Iterator[TensorScan]:
        """Every tensor, in storage order (each file read front to back)."""
        for key, meta in self.source.metas().items():
            yield self.scan(key, meta)

    def scan(self, key: str, meta: TensorMeta) -> TensorScan:
        digest = hashlib.sha256()
        counter = _Counter(meta.dtype.name, meta.dtype.itemsize)
        span = self.source.raw_span(key)
        if meta.stored and span is None:
            stored = self.source.stored_span(key)
            if stored is not None:
                counter = self._blocks(key, meta, stored, digest)
                return self._result(key, meta, digest, counter)
        if span is not None:
            if span.length != meta.nbytes:
                raise SourceError(self.source.name, f"tensor {key!r} ({meta}) spans {span.length} bytes, not {meta.nbytes}")
            for chunk in self._chunks(span.path, span.offset, span.length, key):
                digest.update(chunk)
                counter.add(chunk)
        else:
            self._examine_loaded(key, counter, hash_into=digest)
        return self._result(key, meta, digest, counter)

    def _result(self, key: str, meta: TensorMeta, digest: "hashlib._Hash", counter: _Counter) -> TensorScan:
        examined = counter.view is not None and meta.numel > 0
        return TensorScan(
            key,
            digest.hexdigest(),
            meta.numel,
            nan=counter.nan,
            inf=counter.inf,
            first_bad=counter.first_bad,
            zero=examined and counter.zero,
            constant=examined and counter.constant,
            checked_values=examined or meta.numel == 0,
        )

    def _blocks(self, key: str, meta: TensorMeta, span: RawSpan, digest: "hashlib._Hash") -> _Counter:
        """A block-quantized GGUF tensor: hash its blocks as stored, examine its values dequantized a chunk of blocks at a time.

        Loading it whole through the reader would hold it in float32: a 262,144-token embedding
        stored in 90 MB of Q4_K would take 670 MB.
        """
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType[meta.stored]
        type_size = GGML_QUANT_SIZES[qtype][1]
        size = max(type_size, CHUNK // 8 // type_size * type_size)  # about 8 floats per stored byte at 4 bits
        counter = _Counter("float32", 4)  # the values as dequantized
        for chunk in self._chunks(span.path, span.offset, span.length, key, size):
            digest.update(chunk)
            values = dequantize(np.frombuffer(chunk, dtype=np.uint8), qtype).astype(np.float32, copy=False)
            counter.add(memoryview(np.ascontiguousarray(values).reshape(-1)).cast("B"))
        return counter

    def _examine_loaded(self, key: str, counter: _Counter, hash_into: "hashlib._Hash | None") -> None:
        """Load the tensor through the reader (imports torch) and feed its bytes, a chunk at a time."""
        import torch

        tensor = self.source.load(key).contiguous()
        if tensor.numel() == 0:
            return
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        for start in range(0, raw.nbytes, CHUNK):
            chunk = raw[start : start + CHUNK].data
            if hash_into is not None:
                hash_into.update(chunk)
            counter.add(chunk)

    def _chunks(self, path: Path, offset: int, length: int, key: str, size: int | None = None) -> Iterator[memoryview]:
        """The bytes ``[offset, offset + length)`` of ``path`` in whole chunks of ``size`` (at most :data:`CHUNK`) bytes."""
        size = min(size or CHUNK, CHUNK)
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb", buffering=0)
        f.seek(offset)
        view = memoryview(self._buffer)
        left = length
        while left:
            want, got = min(left, size), 0
            while got < want:  # whole chunks: a short read would split an element between two
                n = f.readinto(view[got:want])
                if not n:
                    done = length - left + got
                    raise SourceError(path, f"tensor {key!r} is cut short: {done} of {length} bytes present")
                got += n
            left -= want
            yield view[:want]
