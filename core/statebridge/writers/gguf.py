"""GGUF writer: header and tensor infos at :meth:`GGUFWriter.begin`, tensor data as it arrives.

GGUF puts every tensor's name, shape, type and data offset in the header, in
front of the data.  The plan announces all output metas before the first tensor
arrives, so the whole header can be written up front and each tensor's bytes
written at its offset as :meth:`GGUFWriter.write` receives it: only one tensor
is ever held, however large the model.

The header holds the bytes ``gguf.GGUFWriter`` (the llama.cpp project's own Python
writer) would write for the same fields and tensors, byte for byte, but is encoded
here (:func:`_encode_value`): a field carried unchanged from a GGUF source is written
as the bytes the source stores (:attr:`GGUFField.encoded`), so a 262,144-token
vocabulary is copied, not decoded into Python strings and packed again item by item.
Each tensor is placed at the offset the header gives it (the library's own layout:
aligned start, each tensor padded to the alignment), which accepts tensors in any
order, lets :meth:`GGUFWriter.write_raw` copy unchanged tensors in the kernel, and
gives the same bytes whatever the arrival order.

With ``shard_size`` a folder target is written as parts named and laid out as llama.cpp's
``gguf-split --split-max-size`` writes them: ``model-00001-of-0000N.gguf`` ...; a new
part starts where the next tensor (padded to the alignment) would take the current one
past ``shard_size``, tensors are never cut, and a tensor larger than ``shard_size`` gets a
part of its own.  Every part holds ``split.no`` (u16, from 0), ``split.count`` (u16) and
``split.tensors.count`` (i32), after the model's key-values in the first part; the other
parts hold nothing else but ``general.alignment`` where it is not the default and the run's
``statebridge.fingerprint`` (so that a later run knows them as its own to replace, and a
reader tells a part of another run).
:func:`~statebridge.readers.gguf.open_gguf` reads the set back as one source.

Computed tensors are stored unquantized in their own dtype: F32, F16, BF16,
F64, I8, I16, I32, I64.  A quantized tensor a plan carries unchanged (its meta
keeps a ``stored`` type such as Q4_K) is announced in that type and filled by
:meth:`GGUFWriter.write_raw` with the source's blocks, byte for byte.  Other dtypes (bool, unsigned ints, float8, complex) have no
GGUF type and are refused at :meth:`GGUFWriter.begin` with a
:class:`~statebridge.errors.ConfigError` naming the key; cast them first.
Shapes are written as ggml expects, fastest dimension first (``reversed`` of
the torch shape), so :class:`~statebridge.readers.gguf.GGUFSource`, ``gguf.GGUFReader``
and llama.cpp read back the torch shape.  ggml tensors have at most 4
dimensions, so larger ranks are refused too.

Metadata, later entries winning: ``general.architecture = "statebridge"``;
when the source is a GGUF file, every one of its key-value fields with its
stored type (:meth:`GGUFWriter.carry`: architecture, name, ``<arch>.*``
hyperparameters, tokenizer arrays...), except its ``statebridge.*`` fields, its
``split.*`` fields (they describe how the source was cut into files, not the model) and
with ``general.file_type`` kept when every quantized tensor kept its type
and no output was computed from a quantized one (``dequantized``), recomputed
for the tensors written otherwise; every
``metadata`` string entry as a GGUF string (``general.alignment`` as the UINT32 the
format requires); then typed values given with ``fields=`` as
:class:`~statebridge.readers.gguf.GGUFField` values or plain Python values.  A run's
``metadata:`` edits (:mod:`statebridge.writers.metadata`) set typed values there, keeping
a carried field's type, and delete carried fields (``null``).  The
output holds no timestamps: the same inputs give the same bytes.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, GGMLQuantizationType, GGUFValueType, LlamaFileType
from gguf import GGUFWriter as _LibWriter

from ..errors import ConfigError, ExecutionError
from ..tensors.provenance import FINGERPRINT_KEY, is_reserved
from ..readers.base import RawSpan, Source
from ..readers.gguf import SPLIT_COUNT_KEY, SPLIT_NO_KEY, SPLIT_TENSORS_KEY, GGUFField, GGUFSource
from ..tensors.meta import DTYPES, DType, TensorMeta, dtype_name
from .base import PlannedFile, Writer
from .rawcopy import copy_spans, start_writeback, write_at

if TYPE_CHECKING:
    import torch

DEFAULT_ARCHITECTURE = "statebridge"
ARCHITECTURE_KEY = "general.architecture"
ALIGNMENT_KEY = "general.alignment"
FILE_TYPE_KEY = "general.file_type"
#: ggml's GGML_MAX_DIMS: llama.cpp refuses files with tensors of higher rank
MAX_DIMS = 4
#: the most parts llama.cpp's names can count (``%05d``) and ``split.count`` (u16) can hold
MAX_PARTS = 65535
#: start writing a part's dirty pages back after this many bytes (see :func:`~statebridge.writers.rawcopy.start_writeback`)
WRITEBACK_EVERY = 64 * 1024**2

#: the llama.cpp file type of a file whose most common tensor type is this (llama.cpp's own guess)
FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
}

#: torch dtype -> (GGML type, numpy dtype of the same width used to hand the bytes to gguf)
GGUF_DTYPES: dict[DType, tuple[GGMLQuantizationType, np.dtype]] = {
    DTYPES["float32"]: (GGMLQuantizationType.F32, np.dtype(np.float32)),
    DTYPES["float16"]: (GGMLQuantizationType.F16, np.dtype(np.float16)),
    DTYPES["bfloat16"]: (GGMLQuantizationType.BF16, np.dtype(np.int16)),  # numpy has no bfloat16
    DTYPES["float64"]: (GGMLQuantizationType.F64, np.dtype(np.float64)),
    DTYPES["int8"]: (GGMLQuantizationType.I8, np.dtype(np.int8)),
    DTYPES["int16"]: (GGMLQuantizationType.I16, np.dtype(np.int16)),
    DTYPES["int32"]: (GGMLQuantizationType.I32, np.dtype(np.int32)),
    DTYPES["int64"]: (GGMLQuantizationType.I64, np.dtype(np.int64)),
}

#: struct format of each scalar value type, as ``gguf.GGUFWriter`` packs it
_PACKING: dict[GGUFValueType, str] = _LibWriter._simple_value_packing


@dataclass
class _Part:
    """One file of the output: its tensors, where their data starts and ends, and its descriptor once open."""

    name: str
    keys: list[str]
    header: bytes = b""
    end: int = 0
    fd: int = -1
    dirty: tuple[int, int, int] = (2**63, 0, 0)  # (first, end, bytes) written since the last writeback was started


class GGUFWriter(Writer):
    """Writes one ``.gguf`` file, or with ``shard_size`` a folder of split parts, streaming tensor data after up-front headers."""

    format: ClassVar[str] = "gguf"
    stores_quantized: ClassVar[bool] = True

    def __init__(
        self,
        path: Path,
        *,
        metadata: Mapping[str, str] | None = None,
        shard_size: int | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(path, metadata=metadata, shard_size=shard_size)
        #: split into parts: a folder target with ``shard_size`` (a ``.gguf`` file target is one file, as a
        #: ``.safetensors`` one is: the parts of a split model are committed together as a folder)
        self.split = shard_size is not None and self.path.suffix.lower() != ".gguf"
        #: typed key-value fields (``GGUFField`` or plain values); these win over ``metadata`` strings
        self.fields: dict[str, Any] = dict(fields or {})
        #: the source GGUF file's own fields (see :meth:`carry`); ``metadata`` and ``fields`` win over them
        self.carried: dict[str, GGUFField] = {}
        #: outputs computed in float from quantized inputs (set by ``trust.quantized.fit_types``): when there are
        #: none, the source's ``general.file_type`` (Q4_K_M, ...) still describes the file and is kept
        self.dequantized: list[str] = []
        self._parts: list[_Part] = []
        self._metas: dict[str, TensorMeta] = {}
        self._nbytes: dict[str, int] = {}
        self._where: dict[str, tuple[_Part, int]] = {}  # key -> (its part, absolute offset there)
        self._written: set[str] = set()
        self._started = False

    @property
    def writes_folder(self) -> bool:
        """With ``shard_size``, the parts of a split GGUF in a folder; else one file."""
        return self.split

    @classmethod
    def for_target(cls, target: Path) -> bool:
        return Path(target).suffix.lower() == ".gguf"

    def carry(self, source: Source) -> None:
        """Keep every key-value field of a source GGUF file, with its stored type, but its ``statebridge.*`` and ``split.*`` ones."""
        if isinstance(source, GGUFSource):
            self.carried = {k: f for k, f in source.typed_fields.items() if not is_reserved(k) and k not in _SPLIT_KEYS}
        else:
            super().carry(source)

    def check(self, metas: Mapping[str, TensorMeta]) -> None:
        super().check(metas)
        for key, meta in metas.items():
            if meta.dtype not in GGUF_DTYPES:
                raise self.refuse(
                    key,
                    f"GGUF has no {dtype_name(meta.dtype)} type; cast it to one of "
                    + ", ".join(dtype_name(d) for d in GGUF_DTYPES),
                )
            if len(meta.shape) > MAX_DIMS:
                raise self.refuse(
                    key, f"its shape is {list(meta.shape)}, but ggml tensors have at most {MAX_DIMS} dimensions; reshape it first"
                )

    def layout(self, metas: Mapping[str, TensorMeta]) -> list[PlannedFile]:
        """The file, or the split parts; quantized tensors count at their stored size, as they will be written."""
        self.check(metas)
        alignment = self._alignment(self._key_values(metas))
        return [
            PlannedFile(part.name, part.keys, sum(metas[k].stored_nbytes for k in part.keys))
            for part in self._split(metas, alignment)
        ]

    # -- begin: validate, then header + key-values + tensor infos --------------------------------

    def begin(self, metas: Mapping[str, TensorMeta]) -> None:
        if self._started:
            raise ExecutionError(f"{self.path}: begin() was called twice")
        if sys.byteorder != "little":  # pragma: no cover - tensors are written from memory as they are
            raise ConfigError(f"GGUF output {self.path}: writing GGUF on a big-endian machine is not supported")
        self.check(metas)
        kv = self._key_values(metas)
        alignment = self._alignment(kv)
        self._nbytes = {key: meta.stored_nbytes for key, meta in metas.items()}
        parts = self._split(metas, alignment)
        if ALIGNMENT_KEY in kv:
            kv[ALIGNMENT_KEY] = GGUFField(alignment, GGUFValueType.UINT32)  # the type the format requires
        if self.split:  # the parts' own split keys are added below, once
            kv = {k: v for k, v in kv.items() if k not in _SPLIT_KEYS}
        try:
            encoded = self._encoded_key_values(kv)
            shared = self._encoded_key_values({k: v for k, v in kv.items() if k in (ALIGNMENT_KEY, FINGERPRINT_KEY)})
            for index, part in enumerate(parts):
                if not self.split:
                    fields = encoded
                else:  # gguf-split: the model's key-values in the first part, the split keys in every part
                    split = self._encoded_key_values({
                        SPLIT_NO_KEY: GGUFField(index, GGUFValueType.UINT16),
                        SPLIT_COUNT_KEY: GGUFField(len(parts), GGUFValueType.UINT16),
                        SPLIT_TENSORS_KEY: GGUFField(len(metas), GGUFValueType.INT32),
                    })
                    fields = (encoded if index == 0 else shared) + split
                self._lay_out(part, fields, metas, alignment)
        except (ValueError, TypeError, OverflowError, struct.error) as e:
            # a typed field whose value does not fit its type, a non-string where a string belongs, ...
            raise ConfigError(f"GGUF output {self.path}: cannot write the header: {e}") from None

        self._started = True
        self._parts, self._metas, self._written = parts, dict(metas), set()
        (self.path if self.split else self.path.parent).mkdir(parents=True, exist_ok=True)
        for part in parts:
            path = self._file(part)
            try:
                part.fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
                if os.fstat(part.fd).st_size:
                    # Not O_TRUNC for the empty file a transaction stages: on ext4 a truncation to
                    # zero marks the file for a flush of all its data at close (auto_da_alloc), which
                    # made close() wait 3 s for a 2.2 GB copy even with durable=False.
                    os.ftruncate(part.fd, 0)
                write_at(part.fd, part.header, 0)
                os.ftruncate(part.fd, part.end)  # the data section starts as a hole the tensors fill in
            except OSError as e:
                raise ExecutionError(f"{path}: cannot lay out the file: {e.strerror or e}") from None

    def _key_values(self, metas: Mapping[str, TensorMeta]) -> dict[str, Any]:
        """Architecture first (as llama.cpp writes it), then the source's fields, string metadata, typed fields."""
        kv: dict[str, Any] = {ARCHITECTURE_KEY: DEFAULT_ARCHITECTURE, **self.carried}
        carried_type = self.carried.get(FILE_TYPE_KEY)
        if carried_type is not None and (self.dequantized or not any(m.stored for m in metas.values())):
            # The source's file type described its tensors (Q4_K_M, ...); these are no longer all stored as they were.
            kv[FILE_TYPE_KEY] = GGUFField(_file_type(metas), carried_type.type)
        for key, value in self.metadata.items():
            kv[str(key)] = str(value)
        for key, value in self.fields.items():
            kv[str(key)] = value
        return kv

    def _alignment(self, kv: Mapping[str, Any]) -> int:
        """The data alignment ``general.alignment`` asks for (a UINT32 power of two), else GGUF's default."""
        value = kv.get(ALIGNMENT_KEY)
        if value is None:
            return GGUF_DEFAULT_ALIGNMENT
        value = value.value if isinstance(value, GGUFField) else value
        try:
            alignment = int(value)
        except (TypeError, ValueError):
            alignment = 0
        if alignment <= 0 or alignment & (alignment - 1) or alignment >= 2**32:
            raise ConfigError(f"GGUF output {self.path}: bad {ALIGNMENT_KEY} {value!r}: must be a non-zero power of two")
        return alignment

    def _split(self, metas: Mapping[str, TensorMeta], alignment: int) -> list[_Part]:
        """The output files and their tensors: one file, or parts of at most ``shard_size`` as gguf-split cuts them."""
        if not self.split or self.shard_size is None:
            return [_Part(self.path.name, list(metas))]
        groups: list[list[str]] = [[]]
        size = 0
        for key in metas:
            padded = _pad(metas[key].stored_nbytes, alignment)
            if groups[-1] and size + padded > self.shard_size:
                groups.append([])
                size = 0
            groups[-1].append(key)
            size += padded
        if len(groups) > MAX_PARTS:
            raise ConfigError(
                f"GGUF output {self.path}: shard_size {self.shard_size} cuts the model into {len(groups)} parts; "
                f"split GGUF allows at most {MAX_PARTS}: choose a larger shard_size"
            )
        return [_Part(f"{self.stem}-{i + 1:05d}-of-{len(groups):05d}.gguf", keys) for i, keys in enumerate(groups)]

    def _file(self, part: _Part) -> Path:
        return self.path / part.name if self.split else self.path

    def _encoded_key_values(self, kv: Mapping[str, Any]) -> list[bytes]:
        """Each key-value field as GGUF stores it (key, value type, value); architecture and alignment first, as gguf.GGUFWriter puts them."""
        out = []
        for key in sorted(kv, key=lambda k: _FIRST.get(k, len(_FIRST))):  # stable: the other keys keep their order
            field = self._typed(key, kv[key])
            value = field.encoded if field.encoded is not None else _encode_value(field.value, field.type, field.sub_type)
            out.append(_encode_string(key) + struct.pack("<I", field.type) + value)
        return out

    def _typed(self, key: str, value: Any) -> GGUFField:
        """``value`` as a typed field (plain values get the type ``gguf.GGUFValueType.get_type`` gives them)."""
        if isinstance(value, GGUFField):
            field = value
        else:
            try:
                vtype = GGUFValueType.get_type(value)
            except ValueError:
                raise ConfigError(
                    f"GGUF output {self.path}: metadata {key!r} is a {type(value).__name__}; "
                    "use str, int, float, bool or a list of one of them"
                ) from None
            if vtype == GGUFValueType.INT32 and not -(2**31) <= value < 2**31:
                vtype = GGUFValueType.INT64
            if key == ALIGNMENT_KEY:
                vtype = GGUFValueType.UINT32  # the format requires it
            # A plain list's element type is left to _encode_value, which, as gguf does, checks every item against
            # the first's: taking the first item's type here let [1, "a"] fail inside struct with a bare "not an integer".
            field = GGUFField(value, vtype)
        if field.type == GGUFValueType.ARRAY and not field.count:
            raise ConfigError(f"GGUF output {self.path}: metadata {key!r} is an empty array, which gguf cannot write")
        return field

    def _lay_out(self, part: _Part, fields: list[bytes], metas: Mapping[str, TensorMeta], alignment: int) -> None:
        """Encode a part's header (as gguf.GGUFWriter would) and place each of its tensors after it."""
        infos = bytearray()
        offset = 0
        relative = {}
        for key in part.keys:
            meta = metas[key]
            infos += _encode_string(key)
            infos += struct.pack(f"<I{len(meta.shape)}QI", len(meta.shape), *reversed(meta.shape), _ggml_type(meta))
            infos += struct.pack("<Q", offset)
            relative[key] = offset
            offset += _pad(self._nbytes[key], alignment)
        head = struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(part.keys), len(fields))
        part.header = head + b"".join(fields) + bytes(infos)
        data_start = _pad(len(part.header), alignment)
        part.end = data_start + offset
        for key, begin in relative.items():
            self._where[key] = (part, data_start + begin)

    # -- tensor data, each at the offset its header entry names ----------------------------------

    def _slot(self, key: str) -> tuple[TensorMeta, int]:
        meta = self.announced(key, self._metas, self._written, started=self._started)
        return meta, self._where[key][1]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        import torch

        meta, offset = self._slot(key)
        if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
            raise ExecutionError(f"{self.path}: {key!r} is {TensorMeta.of(tensor)} but begin() announced {meta}")
        if meta.stored and not meta.encode:
            raise ExecutionError(f"{self.path}: {key!r} was announced as {meta.stored} blocks, which only write_raw can fill")
        if meta.nbytes:
            if meta.encode:  # a type a quantize step asked for: the gguf library's own blocks of the float values
                from gguf.quants import quantize

                data = quantize(tensor.detach().to("cpu").contiguous().numpy(), GGMLQuantizationType[meta.stored])
                if data.nbytes != self._nbytes[key]:
                    raise ExecutionError(f"{self.path}: {key!r} encoded to {data.nbytes} bytes of {meta.stored}, not {self._nbytes[key]}")
            else:
                # little-endian row-major bytes straight from the tensor's memory (x86/ARM hosts are little-endian)
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            part = self._where[key][0]
            try:
                write_at(part.fd, data, offset)
            except OSError as e:
                raise ExecutionError(f"{self._file(part)}: cannot write {key!r}: {e.strerror or e}") from None
            self._wrote(part, offset, data.nbytes)
        self._written.add(key)

    def write_raw(self, key: str, spans: Sequence[RawSpan]) -> bool:
        """Copy stored bytes (plain little-endian values or quantized blocks, as GGUF stores them) in the kernel."""
        meta, offset = self._slot(key)
        nbytes = self._nbytes[key]
        if sum(span.length for span in spans) != nbytes:
            return False
        if nbytes:
            part = self._where[key][0]
            try:
                copy_spans(spans, part.fd, offset)
            except OSError as e:
                raise ExecutionError(f"{self._file(part)}: cannot copy {key!r} from {spans[0].path}: {e.strerror or e}") from None
            self._wrote(part, offset, nbytes)
        self._written.add(key)
        return True

    def _wrote(self, part: _Part, offset: int, nbytes: int) -> None:
        """Count bytes written to ``part``; every 64 MB, start writing that stretch back (durable runs only).

        The final fsync then finds little left to write: the disk works during the copy, as in
        the safetensors writer (about 2x faster durable commits of multi-gigabyte files there).
        """
        if not self.durable:
            return
        first, end, dirty = part.dirty
        first, end, dirty = min(first, offset), max(end, offset + nbytes), dirty + nbytes
        if dirty >= WRITEBACK_EVERY:
            start_writeback(part.fd, first, end - first)
            first, end, dirty = 2**63, 0, 0
        part.dirty = (first, end, dirty)

    # -- finish / abort --------------------------------------------------------------------------

    def finish(self) -> list[Path]:
        if not self._started:
            raise ExecutionError(f"{self.path}: finish() before begin()")
        missing = [k for k in self._metas if k not in self._written]
        if missing:
            raise ExecutionError(
                f"{self.path}: {len(missing)} announced tensors were never written, e.g. {missing[0]!r}"
            )
        files = []
        for part in self._parts:
            # Padding between tensors was never written: the file was laid out at its final size
            # as a hole, so those gaps read as zeros whatever order the tensors came in.
            self.sync(part.fd)
            os.close(part.fd)
            part.fd = -1
            files.append(self._file(part))
        self._started = False
        return files

    def abort(self) -> None:
        self._started = False
        for part in self._parts:
            if part.fd >= 0:
                try:
                    os.close(part.fd)
                except OSError:
                    pass
                part.fd = -1


def _file_type(metas: Mapping[str, TensorMeta]) -> int:
    """``general.file_type`` for these tensors, as llama.cpp guesses it: from the type most tensors have.

    Ties go to the type that reached the count first, in write order, as in llama.cpp; types without
    a file type of their own (F32, integers) give ``ALL_F32``, llama.cpp's fallback.
    """
    counts: dict[GGMLQuantizationType, int] = {}
    best, most = GGMLQuantizationType.F32, 0
    for meta in metas.values():
        ggml_type = _ggml_type(meta)
        counts[ggml_type] = counts.get(ggml_type, 0) + 1
        if counts[ggml_type] > most:
            best, most = ggml_type, counts[ggml_type]
    return int(FILE_TYPES.get(best, LlamaFileType.ALL_F32))


def _ggml_type(meta: TensorMeta) -> GGMLQuantizationType:
    """The GGML type a tensor is written in: its stored (quantized) type if it keeps one, else its dtype's."""
    return GGMLQuantizationType[meta.stored] if meta.stored else GGUF_DTYPES[meta.dtype][0]


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _encode_string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> bytes:
    """A value as ``gguf.GGUFWriter._pack_val`` packs it (little-endian), arrays of numbers and strings in one go."""
    fmt = _PACKING.get(vtype)
    if fmt is not None:
        return struct.pack(("" if vtype == GGUFValueType.BOOL else "<") + fmt, value)
    if vtype == GGUFValueType.STRING:
        return _encode_string(value)
    if vtype != GGUFValueType.ARRAY:
        raise ValueError(f"invalid GGUF value type {vtype!r}")
    if not isinstance(value, Sequence):
        raise ValueError("invalid GGUF metadata array, expecting a sequence")
    if not value:
        raise ValueError("invalid GGUF metadata array: empty")
    if sub_type is None and isinstance(value, bytes):
        sub_type = GGUFValueType.UINT8
    elif sub_type is None:
        sub_type = GGUFValueType.get_type(value[0])
        if not all(GGUFValueType.get_type(item) is sub_type for item in value[1:]):
            raise ValueError("all items in a GGUF array should be of the same type")
    head = struct.pack("<IQ", sub_type, len(value))
    item_fmt = _PACKING.get(sub_type)
    if item_fmt is not None and sub_type != GGUFValueType.BOOL:
        return head + struct.pack(f"<{len(value)}{item_fmt}", *value)
    if sub_type == GGUFValueType.STRING:
        return head + b"".join(_encode_string(item) for item in value)
    return head + b"".join(_encode_value(item, sub_type) for item in value)


#: split keys are the layout of the source's files, not the model's: never carried (a split target writes its own)
_SPLIT_KEYS = frozenset({SPLIT_NO_KEY, SPLIT_COUNT_KEY, SPLIT_TENSORS_KEY})
#: keys gguf.GGUFWriter always writes first, in this order
_FIRST = {ARCHITECTURE_KEY: 0, ALIGNMENT_KEY: 1}
